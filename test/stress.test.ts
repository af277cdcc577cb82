import { assert, test } from "./harness.ts";
import { redefine } from "../mod.ts";
import { redefineToOriginal } from "../src/redefine.ts";
import { assemble, libc, unassemble } from "./native.ts";
import { log } from "node:console";

// thread_loop(record): until record.stop, call record.fn and count what it returned:
// 1 → record.ones, 2 → record.twos, anything else → record.others. Every 1024 calls it yields the
// CPU, so that on a 2-core machine the JS thread doing the patching still gets to run.
const THREAD_LOOP = [
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
const RETURN_1 = [0xb8, 0x01, 0, 0, 0, 0xc3]; // mov eax, 1; ret
const RETURN_2 = [0xb8, 0x02, 0, 0, 0, 0xc3]; // mov eax, 2; ret
const TOGGLES = 100_000;

/**
 * Two native threads call `targets[0]` and `targets[1]` in a loop while the JS thread runs
 * `toggle` TOGGLES times; returns what the threads saw.
 */
function hammer(targets: bigint[], toggle: (i: number) => void): { ones: bigint; twos: bigint; others: bigint } {
  const loop = assemble(THREAD_LOOP);
  const records = targets.map((target) => new BigUint64Array([target, 0n, 0n, 0n, 0n, 0n]));
  const bytes = (a: BigUint64Array) => new Uint8Array(a.buffer);
  const ids = records.map((record) => {
    const id = new BigUint64Array(1);
    if (libc.pthread_create(bytes(id), 0n, loop.address, bytes(record)) !== 0) throw new Error("pthread_create failed");
    return id[0];
  });
  try {
    for (let i = 0; i < TOGGLES; i++) toggle(i);
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
  const targets = [0, 5].map((offset) => assemble([...Array(offset).fill(0x90), ...RETURN_1, ...Array(16).fill(0xcc)]));
  const addresses = [targets[0].address, targets[1].address + 5n];
  const replacement = assemble(RETURN_2);
  try {
    const seen = hammer(addresses, (i) => {
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

test(`stress: ${TOGGLES} identity hooks through call-original trampolines, on and off under two calling threads`, () => {
  const target = assemble([...RETURN_1, ...Array(16).fill(0xcc)], 5);
  try {
    const seen = hammer([target.address, target.address], () => {
      redefineToOriginal({ address: target.address, size: 16, parameters: [], result: "i32" }).restore();
    });
    log(`stress trampolines: ${seen.ones} calls saw the original, ${seen.others + seen.twos} anything else`);
    assert.equal(seen.others + seen.twos, 0n, "every call ran the original, directly or relocated");
    assert.ok(seen.ones > 0n);
  } finally {
    unassemble(target.base);
  }
});
