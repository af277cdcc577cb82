import { assert, test } from "./harness.ts";
import { redefine, transaction } from "../mod.ts";
import { PROTECT_FROM } from "../src/code_memory.ts";
import { platform } from "../platform/mod.ts";
import { redefineToOriginal } from "../src/internal.ts";
import { assemble, isArm64, libc, unassemble, words } from "./native.ts";
import { log } from "node:console";
import process from "node:process";

// thread_loop(record): until record.stop, call record.fn and count what it returned:
// 1 → record.ones, 2 → record.twos, anything else → record.others. Every 1024 calls it yields the
// CPU, so that on a 2-core machine the JS thread doing the patching still gets to run.
const THREAD_LOOP = isArm64
  ? words(
    0xa9be7bfd, // stp x29, x30, [sp, #-32]!
    0x910003fd, // mov x29, sp
    0xf9000bf3, // str x19, [sp, #16]
    0xaa0003f3, // mov x19, x0
    0xf9400270, // loop: ldr x16, [x19]
    0xd63f0200, // blr x16
    0x7100041f, // cmp w0, #1
    0x540000a1, // b.ne not_one
    0xf9400669, // ldr x9, [x19, #8]
    0x91000529, // add x9, x9, #1
    0xf9000669, // str x9, [x19, #8]
    0x1400000a, // b next
    0x7100081f, // not_one: cmp w0, #2
    0x540000a1, // b.ne other
    0xf9400a69, // ldr x9, [x19, #16]
    0x91000529, // add x9, x9, #1
    0xf9000a69, // str x9, [x19, #16]
    0x14000004, // b next
    0xf9400e69, // other: ldr x9, [x19, #24]
    0x91000529, // add x9, x9, #1
    0xf9000e69, // str x9, [x19, #24]
    0xb9402a69, // next: ldr w9, [x19, #40]
    0x11000529, // add w9, w9, #1
    0xb9002a69, // str w9, [x19, #40]
    0x7200253f, // tst w9, #0x3ff
    0x54000061, // b.ne check
    0xd2800f88, // mov x8, #124 (sched_yield)
    0xd4000001, // svc #0
    0x39408269, // check: ldrb w9, [x19, #32]
    0x34fffce9, // cbz w9, loop
    0xf9400bf3, // ldr x19, [sp, #16]
    0xa8c27bfd, // ldp x29, x30, [sp], #32
    0xd2800000, // mov x0, #0
    0xd65f03c0, // ret
  )
  : [
  0x53, //                                 push rbx
  0x48, 0x89, 0xfb, //                     mov rbx, rdi
  0xff, 0x13, //                           loop: call [rbx]
  0x48, 0x83, 0xf8, 0x01, //               cmp rax, 1
  0x75, 0x06, //                           jne not_one
  0x48, 0xff, 0x43, 0x08, //               inc qword [rbx+8]
  0xeb, 0x10, //                           jmp next
  0x48, 0x83, 0xf8, 0x02, //               not_one: cmp rax, 2
  0x75, 0x06, //                           jne other
  0x48, 0xff, 0x43, 0x10, //               inc qword [rbx+16]
  0xeb, 0x04, //                           jmp next
  0x48, 0xff, 0x43, 0x18, //               other: inc qword [rbx+24]
  0xff, 0x43, 0x28, //                     next: inc dword [rbx+40]
  0xf7, 0x43, 0x28, 0xff, 0x03, 0, 0, //   test dword [rbx+40], 0x3ff
  0x75, 0x07, //                           jnz check
  0xb8, 0x18, 0, 0, 0, //                  mov eax, 24 (sched_yield)
  0x0f, 0x05, //                           syscall
  0x80, 0x7b, 0x20, 0x00, //               check: cmp byte [rbx+32], 0
  0x74, 0xc9, //                           je loop
  0x5b, //                                 pop rbx
  0x31, 0xc0, //                           xor eax, eax
  0xc3, //                                 ret
  ];
const RETURN_1 = isArm64 ? words(0x52800020, 0xd65f03c0) : [0xb8, 0x01, 0, 0, 0, 0xc3]; // mov eax, 1; ret
const RETURN_2 = isArm64 ? words(0x52800040, 0xd65f03c0) : [0xb8, 0x02, 0, 0, 0, 0xc3]; // mov eax, 2; ret
/** Filler after a function, and before one to shift its entry: `int3`, `nop`; `brk #0`, `nop`. */
const TRAP = isArm64 ? words(0xd4200000) : [0xcc];
const NOP = isArm64 ? words(0xd503201f) : [0x90];
const fill = (bytes: number[], count: number) => Array.from({ length: count / bytes.length }, () => bytes).flat();
// Under qemu-user (scripts/test_arm64.mjs) a redefine costs 20–150 ms (qemu builds /proc/self/maps
// itself, and has no PROCMAP_QUERY).
const TOGGLES = process.env.REDEFINE_TEST_EMULATED ? 200 : 100_000;

/**
 * Two native threads call `targets[0]` and `targets[1]` in a loop while the JS thread runs
 * `toggle` `toggles` times; returns what the threads saw.
 */
function hammer(targets: bigint[], toggles: number, toggle: (i: number) => void): { ones: bigint; twos: bigint; others: bigint } {
  const loop = assemble(THREAD_LOOP);
  const records = targets.map((target) => new BigUint64Array([target, 0n, 0n, 0n, 0n, 0n]));
  const bytes = (a: BigUint64Array) => new Uint8Array(a.buffer);
  const ids = records.map((record) => {
    const id = new BigUint64Array(1);
    if (libc.pthread_create(bytes(id), 0n, loop.address, bytes(record)) !== 0) throw new Error("pthread_create failed");
    return id[0];
  });
  try {
    for (let i = 0; i < toggles; i++) toggle(i);
  } finally {
    for (const record of records) Atomics.store(record, 4, 1n);
    for (const id of ids) libc.pthread_join(id, 0n);
    unassemble(loop.base);
  }
  const sum = (k: number) => records.reduce((n, r) => n + r[k], 0n);
  return { ones: sum(1), twos: sum(2), others: sum(3) };
}

test(`stress: ${TOGGLES} native redirects on and off under two calling threads`, () => {
  // One entry inside an aligned 8-byte word (one atomic store), one across two (spin, tail, head).
  // An arm64 entry jump is one aligned word: always one store.
  const offsets = isArm64 ? [0, 4] : [0, 5];
  const targets = offsets.map((offset) => assemble([...fill(NOP, offset), ...RETURN_1, ...fill(TRAP, 16)]));
  const addresses = targets.map((t, i) => t.address + BigInt(offsets[i]));
  const replacement = assemble(RETURN_2);
  try {
    const seen = hammer(addresses, TOGGLES, (i) => {
      const address = addresses[i % 2];
      redefine({ address, size: 16, parameters: [], result: "i32" }, replacement.address).restore();
    });
    log(`stress: ${seen.ones} calls saw the original, ${seen.twos} the replacement, ${seen.others} anything else`);
    assert.equal(seen.others, 0n, "every result is the original's or the replacement's");
    assert.ok(seen.ones > 0n && seen.twos > 0n, "both were seen");
  } finally {
    for (const t of [...targets, replacement]) unassemble(t.base);
  }
});

// Batches large enough for writeCode to make the page writable with one mprotect pair and store
// plainly on any layer (src/code_memory.ts, PROTECT_FROM; Linux takes that way for lone patches
// too, `Os.protectFrom`): the same guarantee for a batch.
test(`stress: ${TOGGLES / 10} batches of native redirects taking the mprotect way, on and off under two calling threads`, () => {
  const offsets = isArm64 ? [0, 4] : [0, 5];
  // Each hammered function, then PROTECT_FROM more on its page, patched with it in one transaction.
  const blocks = offsets.map((offset) =>
    assemble([
      ...fill(NOP, offset), ...RETURN_1, ...fill(TRAP, 32 - offset - RETURN_1.length),
      ...Array.from({ length: PROTECT_FROM }, () => [...RETURN_1, ...fill(TRAP, 32 - RETURN_1.length)]).flat(),
    ])
  );
  const batches = blocks.map((b, i) => [
    b.address + BigInt(offsets[i]!),
    ...Array.from({ length: PROTECT_FROM }, (_, k) => b.address + BigInt(32 * (k + 1))),
  ]);
  const replacement = assemble(RETURN_2);
  const { os } = platform();
  const protect = os.protect;
  let protects = 0;
  os.protect = (start, length, protection) => {
    protects++;
    protect(start, length, protection);
  };
  try {
    const seen = hammer(batches.map((batch) => batch[0]!), TOGGLES / 10, (i) => {
      const patches = transaction(() =>
        batches[i % 2]!.map((address) => redefine({ address, size: 16, parameters: [], result: "i32" }, replacement.address))
      );
      transaction(() => patches.forEach((patch) => patch.restore()));
    });
    log(`stress (mprotect way): ${seen.ones} calls saw the original, ${seen.twos} the replacement, ${seen.others} anything else`);
    assert.equal(seen.others, 0n, "every result is the original's or the replacement's");
    assert.ok(seen.ones > 0n && seen.twos > 0n, "both were seen");
    assert.ok(protects >= (4 * TOGGLES) / 10, "each batch made its page writable and back");
  } finally {
    os.protect = protect;
    for (const t of [...blocks, replacement]) unassemble(t.base);
  }
});

test(`stress: ${TOGGLES} identity hooks through call-original trampolines, on and off under two calling threads`, () => {
  const target = assemble([...RETURN_1, ...fill(TRAP, 16)], isArm64 ? 4 : 5);
  try {
    const seen = hammer([target.address, target.address], TOGGLES, () => {
      redefineToOriginal({ address: target.address, size: 16, parameters: [], result: "i32" }).restore();
    });
    log(`stress trampolines: ${seen.ones} calls saw the original, ${seen.others + seen.twos} anything else`);
    assert.equal(seen.others + seen.twos, 0n, "every call ran the original, directly or relocated");
    assert.ok(seen.ones > 0n);
  } finally {
    unassemble(target.base);
  }
});
