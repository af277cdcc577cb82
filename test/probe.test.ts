/**
 * The native probe: its code read back with the reference disassemblers (iced-x86, Capstone in
 * objdump's syntax), per OS and with or without its copy of the function's first instructions;
 * then run live in front of libc functions, layered, a recursive function, two native threads
 * calling alongside the JS thread (the owner's counter and the shared one), and in a generated
 * library's import slots (`callers`).
 */
import { assert, test } from "./harness.ts";
import { disassemble as disassembleX86 } from "./canned_listing.ts";
import { disassemble as disassembleArm64, h } from "./objdump_aarch64.ts";
import { probe as x86_64 } from "../src/arch/x86_64/probe.ts";
import { probe as aarch64 } from "../src/arch/aarch64/probe.ts";
import { x86_64 as x86_64Arch } from "../src/arch/x86_64/mod.ts";
import { aarch64 as aarch64Arch } from "../src/arch/aarch64/mod.ts";
import { clockRate, probeNatively } from "../src/trace/native_probe.ts";
import { PROBE_RECORD } from "../src/arch/probe.ts";
import { restoreAll } from "../mod.ts";
import process from "node:process";
import { loadImportLibrary } from "./import_library.ts";
import { assemble, bytesAt, callOnAnotherThread, cstr, isArm64, libc, os, runtime, unassemble, words } from "./native.ts";

const AT = 0x7f00_0000_1000n;
const DATA = 0x7f00_0000_2008n;
/** The original, within a direct jump's reach of the probe, and out of it. */
const NEAR = 0x7f00_0000_0800n, FAR = 0x7000_0000_0000n;
const word = (offset: number) => `${(DATA + BigInt(offset)).toString(16).toUpperCase()}h`;
const at = (offset: number) => `${(AT + BigInt(offset)).toString(16).toUpperCase()}h`;
const x86 = (original: bigint, timing: boolean, os = "linux") => {
  const code = x86_64.encode({ at: AT, data: DATA, original, timing, os });
  assert.ok(code.length <= x86_64.size(timing, os), "within the size reserved for it");
  assert.equal(x86_64.size(timing, os), x86_64.encode({ at: AT, data: DATA, original: FAR, timing, os }).length);
  return disassembleX86(code, AT);
};
const X86_TO_NEAR = `jmp ${NEAR.toString(16).toUpperCase()}h`;
const X86_TO_FAR = `jmp qword ptr [${word(64)}]`;

test("x86-64 counting probe: the owner thread's plain inc, any other's lock inc, then the original", () => {
  const other = (original: bigint) => original === NEAR ? 0x22 : 0x23;
  for (const [original, toOriginal] of [[NEAR, X86_TO_NEAR], [FAR, X86_TO_FAR]] as const) {
    assert.deepEqual(x86(original, false), [
      "mov r11,fs:[10h]", //                   the thread, as the guard reads it
      `cmp r11,[${word(16)}]`, //              the owner?
      `jne ${at(other(original))}`,
      `inc qword ptr [${word(8)}]`, //         its own counter
      toOriginal,
      `lock inc qword ptr [${word(0)}]`, //    other: the shared one
      toOriginal,
    ]);
  }
  // Where each OS keeps the thread's identity: the guard's own operand.
  assert.equal(x86(NEAR, false, "windows")[0], "mov r11,gs:[30h]");
  assert.equal(x86(NEAR, false, "darwin")[0], "mov r11,gs:[0h]");
});

test("x86-64 timing probe: counts as above, takes the slot, swaps the return address, times with rdtsc, keeps rax/rdx", () => {
  for (const [original, toOriginal] of [[NEAR, X86_TO_NEAR], [FAR, X86_TO_FAR]] as const) {
    const far = original === FAR ? 1 : 0;
    assert.deepEqual(x86(original, true), [
      "mov r11,fs:[10h]",
      `cmp r11,[${word(16)}]`,
      `jne ${at(0x72 + far)}`,
      `inc qword ptr [${word(8)}]`,
      `cmp qword ptr [${word(24)}],0h`, //   0x1d: time
      `jne ${at(0x6d)}`,
      "mov r11d,1h",
      `xchg [${word(24)}],r11`,
      "test r11,r11",
      `jne ${at(0x6d)}`,
      "push rax",
      "push rdx",
      "mov r11,[rsp+10h]",
      `mov [${word(32)}],r11`,
      `lea r11,[${at(0x7f + far)}]`,
      "mov [rsp+10h],r11",
      "rdtsc",
      "shl rdx,20h",
      "or rax,rdx",
      `mov [${word(40)}],rax`,
      "pop rdx",
      "pop rax",
      toOriginal, //                           0x6d: to the original
      `lock inc qword ptr [${word(0)}]`, //    another thread's call
      `jmp ${at(0x1d)}`,
      "push rax", //                           the original returns here
      "push rdx",
      "rdtsc",
      "shl rdx,20h",
      "or rax,rdx",
      `sub rax,[${word(40)}]`,
      `add [${word(48)}],rax`,
      `inc qword ptr [${word(56)}]`,
      `mov r11,[${word(32)}]`,
      `mov qword ptr [${word(24)}],0h`,
      "pop rdx",
      "pop rax",
      "jmp r11",
    ]);
  }
  assert.deepEqual(disassembleX86(x86_64.clockReader, 0n), ["rdtsc", "shl rdx,20h", "or rax,rdx", "ret"]);
});

// labs as glibc has it, at a function's entry 0x7f00_0000_0000: its first two instructions are
// what the entry jump covers, and the probe runs into its own copy of them.
const ENTRY = 0x7f00_0000_0000n;
const LABS = Uint8Array.of(
  0x48, 0x89, 0xf8, //       mov rax, rdi
  0x48, 0xf7, 0xd8, //       neg rax
  0x48, 0x0f, 0x48, 0xc7, // cmovs rax, rdi
  0xc3, //                   ret
);

test("x86-64 probe at a function's entry: the owner's count runs into the probe's copy of the first instructions", () => {
  const plan = x86_64Arch.planRelocation(LABS, ENTRY, 5);
  const inline = (address: bigint) => x86_64Arch.relocate(plan, address);
  const code = x86_64.encode({ at: AT, data: DATA, original: NEAR, inline, timing: false, os: "linux" });
  const back = `jmp ${(ENTRY + 6n).toString(16).toUpperCase()}h`;
  assert.deepEqual(disassembleX86(code, AT), [
    "mov r11,fs:[10h]",
    `cmp r11,[${word(16)}]`,
    `jne ${at(0x28)}`,
    `inc qword ptr [${word(8)}]`,
    "mov rax,rdi", //                        the copy, relocated here
    "neg rax",
    back, //                                 back into the function
    `lock inc qword ptr [${word(0)}]`, //    other: to the trampoline
    X86_TO_NEAR,
  ]);
  const timed = disassembleX86(x86_64.encode({ at: AT, data: DATA, original: NEAR, inline, timing: true, os: "linux" }), AT);
  assert.deepEqual(timed.slice(21, 25), ["pop rax", "mov rax,rdi", "neg rax", back], "every timed path leaves through the copy");
});

test("x86-64 timing probe at a far entry: a long copy of the first instructions (far branch forms) still assembles", () => {
  // test rdi, rdi; je +0x10; mov rax, rdi; neg rax; cmovs rax, rdi: the 14 bytes a far entry jump
  // covers, relocated out of rel32 reach of the function, so the je and the jump back take their
  // 16- and 14-byte absolute forms: a copy of 43 bytes between `time` and the other threads' jump back to it.
  const entry = 0x1000_0000_0000n;
  const labs = Uint8Array.of(0x48, 0x85, 0xff, 0x74, 0x10, 0x48, 0x89, 0xf8, 0x48, 0xf7, 0xd8, 0x48, 0x0f, 0x48, 0xc7, 0xc3);
  const plan = x86_64Arch.planRelocation(labs, entry, 14);
  const inline = (address: bigint) => x86_64Arch.relocate(plan, address);
  assert.equal(inline(AT).length, 43);
  const code = x86_64.encode({ at: AT, data: DATA, original: NEAR, inline, timing: true, os: "linux" });
  // Read from the other threads' path on (the copy's inline addresses would not disassemble):
  // its lock inc and jump back, then the 55 bytes of `exit`.
  const other = code.length - 55 - 5 - 8;
  assert.deepEqual(disassembleX86(code.subarray(other), AT + BigInt(other)).slice(0, 3), [
    `lock inc qword ptr [${word(0)}]`,
    `jmp ${at(0x1d)}`, //                    back to time
    "push rax", //                           exit
  ]);
});

const PAGE = DATA - DATA % 4096n;
const arm64 = (original: bigint, timing: boolean, os = "linux") => {
  const code = aarch64.encode({ at: AT, data: DATA, original, timing, os });
  assert.ok(code.length <= aarch64.size(timing, os), "within the size reserved for it");
  assert.equal(aarch64.size(timing, os), aarch64.encode({ at: AT, data: DATA, original: FAR, timing, os }).length);
  return disassembleArm64(code, AT);
};
const ARM64_RECORD = [`adrp x16, ${h(PAGE)}`, `add x16, x16, #${h(DATA % 4096n)}`];
const arm64Own = (other: bigint) => [
  `adrp x17, ${h(PAGE)}`,
  "mrs x16, tpidr_el0", //                       the thread, as the guard reads it
  "and x16, x16, #0xfffffffffffffff8",
  `ldr x17, [x17, #${Number(DATA % 4096n) + 16}]`, // the owner
  "eor x16, x16, x17",
  `cbnz x16, ${h(AT + other)}`,
  ...ARM64_RECORD,
  "ldr x17, [x16, #8]", //                       its own counter
  "add x17, x17, #0x1",
  "str x17, [x16, #8]",
];
const arm64Shared = (loop: bigint) => [
  "stp x0, x1, [sp, #-16]!",
  ...ARM64_RECORD,
  "ldxr x0, [x16]", //                           loop: the shared counter
  "add x0, x0, #0x1",
  "stxr w1, x0, [x16]",
  `cbnz w1, ${h(AT + loop)}`,
];

test("aarch64 counting probe: the owner thread's plain add, any other's exclusive add, then the original", () => {
  assert.deepEqual(arm64(NEAR, false), [
    ...arm64Own(0x30n),
    `b ${h(NEAR)}`,
    ...arm64Shared(0x3cn), //                    0x30: other
    "ldp x0, x1, [sp], #16",
    `b ${h(NEAR)}`,
  ]);
  assert.deepEqual(arm64(FAR, false), [
    ...arm64Own(0x34n),
    "ldr x16, [x16, #64]",
    "br x16",
    ...arm64Shared(0x40n), //                    0x34: other
    "ldr x16, [x16, #64]",
    "ldp x0, x1, [sp], #16",
    "br x16",
  ]);
  // Where each OS keeps the thread's identity: the guard's own read.
  assert.deepEqual(arm64(NEAR, false, "windows").slice(1, 3), ["mov x16, x18", "and x16, x16, #0xfffffffffffffff8"]);
  assert.deepEqual(arm64(NEAR, false, "darwin").slice(1, 3), ["mrs x16, tpidrro_el0", "and x16, x16, #0xfffffffffffffff8"]);
});

test("aarch64 probe at a function's entry: the owner's count runs into the probe's copy of the first instructions", () => {
  const labs = Uint8Array.from(words(
    0xf100001f, // cmp x0, #0
    0xda805400, // cneg x0, x0, mi
    0xd65f03c0, // ret
  ));
  const plan = aarch64Arch.planRelocation(labs, ENTRY, aarch64Arch.entryJumps[0].size);
  const inline = (address: bigint) => aarch64Arch.relocate(plan, address);
  const encode = (timing: boolean) => aarch64.encode({ at: AT, data: DATA, original: NEAR, inline, timing, os: "linux" });
  const back = `b ${h(ENTRY + 4n)}`;
  assert.deepEqual(disassembleArm64(encode(false), AT), [
    ...arm64Own(0x34n),
    "cmp x0, #0x0", //                           the copy, relocated here
    back, //                                     back into the function
    ...arm64Shared(0x40n), //                    0x34: other, to the trampoline
    "ldp x0, x1, [sp], #16",
    `b ${h(NEAR)}`,
  ]);
  const timed = disassembleArm64(encode(true), AT);
  assert.deepEqual(timed.slice(26, 29), ["ldp x0, x1, [sp], #16", "cmp x0, #0x0", back], "every timed path leaves through the copy");
});

test("aarch64 timing probe: counts as above, takes the slot, points x30 at its exit, times with cntvct_el0, keeps x0/x1", () => {
  for (const original of [NEAR, FAR]) {
    const far = original === FAR ? 4n : 0n;
    const toOriginal = far ? ["ldr x16, [x16, #64]", "ldp x0, x1, [sp], #16", "br x16"] : ["ldp x0, x1, [sp], #16", `b ${h(NEAR)}`];
    assert.deepEqual(arm64(original, true), [
      ...arm64Own(0xb4n + far),
      "stp x0, x1, [sp, #-16]!",
      "add x17, x16, #0x18", //             0x30: time
      "ldr x0, [x17]",
      `cbnz x0, ${h(AT + 0x68n)}`,
      "ldaxr x0, [x17]", //                 0x3c: claim
      `cbnz x0, ${h(AT + 0x64n)}`,
      "mov x0, #0x1",
      "stxr w1, x0, [x17]",
      `cbnz w1, ${h(AT + 0x3cn)}`,
      "str x30, [x16, #32]",
      "mrs x0, cntvct_el0",
      "str x0, [x16, #40]",
      `adr x30, ${h(AT + 0x70n + far)}`,
      `b ${h(AT + 0x68n)}`,
      "clrex", //                           0x64: held
      ...toOriginal, //                     0x68: to the original
      "stp x0, x1, [sp, #-16]!", //         the original returns here
      ...ARM64_RECORD,
      "mrs x0, cntvct_el0",
      "ldr x1, [x16, #40]",
      "sub x0, x0, x1",
      "ldr x1, [x16, #48]",
      "add x1, x1, x0",
      "str x1, [x16, #48]",
      "ldr x1, [x16, #56]",
      "add x1, x1, #0x1",
      "str x1, [x16, #56]",
      "ldr x30, [x16, #32]",
      "add x17, x16, #0x18",
      "stlr xzr, [x17]",
      "ldp x0, x1, [sp], #16",
      "ret",
      ...arm64Shared(0xc0n + far), //       another thread's call
      `b ${h(AT + 0x30n)}`,
    ]);
  }
  assert.deepEqual(disassembleArm64(aarch64.clockReader, 0n), ["mrs x0, cntvct_el0", "ret"]);
});

test("native probe on strtol: every call counted and timed, results untouched, bytes restored exactly", () => {
  const address = os.symbolAddress("strtol", "libc.so.6");
  const bytes = bytesAt(address, 32);
  for (const timing of [false, true]) {
    const probe = probeNatively({ symbol: "strtol", library: "libc.so.6" }, timing);
    let sum = 0;
    for (let i = 0; i < 500; i++) sum += libc.atoi(cstr(String(i)));
    assert.equal(sum, (499 * 500) / 2, "atoi's results pass through");
    const reading = probe.read();
    assert.equal(reading.calls, 500);
    assert.equal(reading.timed, timing ? 500 : 0);
    assert.equal(reading.ticks > 0n, timing);
    probe.restore();
    assert.deepEqual(probe.read(), reading, "the last reading stays after restore");
    assert.deepEqual(bytesAt(address, 32), bytes);
  }
});

test("native probes layered on one function: each counts every call, the upper one continuing into the lower", () => {
  const address = os.symbolAddress("strtol", "libc.so.6");
  const bytes = bytesAt(address, 32);
  const lower = probeNatively({ symbol: "strtol", library: "libc.so.6" }, false);
  const upper = probeNatively({ symbol: "strtol", library: "libc.so.6" }, true);
  for (let i = 0; i < 7; i++) assert.equal(libc.atoi(cstr(String(i))), i);
  assert.deepEqual([upper.read().calls, upper.read().timed, lower.read().calls], [7, 7, 7]);
  upper.restore();
  libc.atoi(cstr("1"));
  assert.deepEqual([upper.read().calls, lower.read().calls], [7, 8]);
  lower.restore();
  assert.deepEqual(bytesAt(address, 32), bytes);
});

test("native probe: calls from another thread are counted and timed too", () => {
  const labs = os.symbolAddress("labs", "libc.so.6");
  const probe = probeNatively({ symbol: "labs", library: "libc.so.6" }, true);
  try {
    assert.equal(libc.labs(-3n), 3n);
    const fromThread = callOnAnotherThread(labs);
    assert.ok(fromThread > 0n, "the other thread got labs' result");
    assert.deepEqual([probe.read().calls, probe.read().timed], [2, 2]);
  } finally {
    probe.restore();
  }
});

// depth(n): n == 0 ? 0 : depth(n - 1) + 1, calling itself through its own (probed) entry.
const RECURSIVE = isArm64
  ? words(
    0xb40000e0, // cbz x0, zero (+0x1c)
    0xa9bf7bfd, // stp x29, x30, [sp, #-16]!
    0xd1000400, // sub x0, x0, #1
    0x97fffffd, // bl depth
    0x91000400, // add x0, x0, #1
    0xa8c17bfd, // ldp x29, x30, [sp], #16
    0xd65f03c0, // ret
    0xd2800000, // zero: mov x0, #0
    0xd65f03c0, // ret
  )
  : [
    0x48, 0x85, 0xff, //             test rdi, rdi
    0x74, 0x14, //                   je zero (+0x19)
    0x48, 0x83, 0xec, 0x08, //       sub rsp, 8: aligned for the call
    0x48, 0xff, 0xcf, //             dec rdi
    0xe8, 0xef, 0xff, 0xff, 0xff, // call depth
    0x48, 0xff, 0xc0, //             inc rax
    0x48, 0x83, 0xc4, 0x08, //       add rsp, 8
    0xc3, //                         ret
    0x31, 0xc0, //                   zero: xor eax, eax
    0xc3, //                         ret
  ];

test("native probe on a recursive function: every level counted, the outermost call timed, the stack intact", () => {
  const { address, base } = assemble(RECURSIVE);
  try {
    const depth = runtime.fnPointer(address, { parameters: ["u64"], result: "u64" }) as (n: bigint) => bigint;
    const probe = probeNatively({ address, size: RECURSIVE.length }, true);
    try {
      assert.equal(depth(10n), 10n);
      assert.equal(depth(3n), 3n);
      assert.deepEqual([probe.read().calls, probe.read().timed], [11 + 4, 2]);
    } finally {
      probe.restore();
    }
    assert.equal(depth(4n), 4n);
  } finally {
    unassemble(base);
  }
});

test("clockRate: the timestamp counter ticks at a plausible rate (10 MHz to 10 GHz)", () => {
  const rate = clockRate(10);
  assert.ok(rate > 0.01 && rate < 10, `${rate} ticks per ns`);
});

test("native probe restored by someone else (restoreAll): the final count stays readable", () => {
  const probe = probeNatively({ symbol: "strtol", library: "libc.so.6" }, true);
  for (let i = 0; i < 3; i++) libc.atoi(cstr("1"));
  restoreAll();
  assert.equal(probe.patch.active, false);
  assert.equal(probe.read().calls, 3);
  libc.atoi(cstr("1"));
  assert.equal(probe.read().calls, 3, "no longer counting");
});

test("native probe with callers: counts and times only that library's calls, through its import slot", () => {
  const lib = loadImportLibrary(runtime, os, "probe_callers_");
  const probe = probeNatively({ symbol: "labs", library: "libc.so.6", callers: lib.path }, true);
  try {
    assert.equal(lib.labs(-5n), 5n);
    assert.equal(lib.labs(-6n), 6n);
    assert.equal(libc.labs(-7n), 7n);
    assert.deepEqual([probe.read().calls, probe.read().timed], [2, 2], "the program's own call is not counted");
  } finally {
    probe.restore();
  }
  assert.equal(lib.labs(-5n), 5n);
});

// hammer(record): calls record[0](-5) record[1] times, the results' sum into record[2].
const HAMMER = isArm64
  ? words(
    0xa9bd7bfd, // stp x29, x30, [sp, #-48]!
    0x910003fd, // mov x29, sp
    0xa90153f3, // stp x19, x20, [sp, #16]
    0xf90013f5, // str x21, [sp, #32]
    0xaa0003f3, // mov x19, x0: the record
    0xf9400674, // ldr x20, [x19, #8]: n
    0xd2800015, // mov x21, #0: the sum
    0x92800080, // top: mov x0, #-5
    0xf9400270, // ldr x16, [x19]
    0xd63f0200, // blr x16
    0x8b0002b5, // add x21, x21, x0
    0xf1000694, // subs x20, x20, #1
    0x54ffff61, // b.ne top
    0xf9000a75, // str x21, [x19, #16]
    0xa94153f3, // ldp x19, x20, [sp, #16]
    0xf94013f5, // ldr x21, [sp, #32]
    0xa8c37bfd, // ldp x29, x30, [sp], #48
    0xd2800000, // mov x0, #0
    0xd65f03c0, // ret
  )
  : [
    0x53, //                                     push rbx
    0x41, 0x54, //                               push r12
    0x41, 0x55, //                               push r13: rsp aligned for the calls
    0x48, 0x89, 0xfb, //                         mov rbx, rdi: the record
    0x4c, 0x8b, 0x63, 0x08, //                   mov r12, [rbx+8]: n
    0x45, 0x31, 0xed, //                         xor r13d, r13d: the sum
    0x48, 0xc7, 0xc7, 0xfb, 0xff, 0xff, 0xff, // top: mov rdi, -5
    0xff, 0x13, //                               call [rbx]
    0x49, 0x01, 0xc5, //                         add r13, rax
    0x49, 0xff, 0xcc, //                         dec r12
    0x75, 0xef, //                               jnz top
    0x4c, 0x89, 0x6b, 0x10, //                   mov [rbx+16], r13
    0x31, 0xc0, //                               xor eax, eax
    0x41, 0x5d, //                               pop r13
    0x41, 0x5c, //                               pop r12
    0x5b, //                                     pop rbx
    0xc3, //                                     ret
  ];

test("native probe under two threads and the JS thread calling at once: no call lost, every result right, the stacks intact", () => {
  const { address: hammer, base } = assemble(HAMMER);
  const labs = os.symbolAddress("labs", "libc.so.6");
  // Long enough for the threads to overlap (about a third of the calls then go untimed); fewer
  // under emulation, where every call is slower.
  const n = process.env.REDEFINE_TEST_EMULATED ? 100_000n : 1_000_000n;
  try {
    for (const timing of [false, true]) {
      const probe = probeNatively({ symbol: "labs", library: "libc.so.6" }, timing);
      try {
        const view = runtime.view(probe.patch.counterAddress!, PROBE_RECORD.size);
        const record = new BigUint64Array(view.buffer, view.byteOffset, PROBE_RECORD.size / 8);
        const shared = () => Number(Atomics.load(record, PROBE_RECORD.calls / 8));
        const records = [0, 1].map(() => new BigUint64Array([labs, n, 0n]));
        const ids = records.map(() => new BigUint64Array(1));
        const bytes = (a: BigUint64Array) => new Uint8Array(a.buffer);
        records.forEach((record, i) => assert.equal(libc.pthread_create(bytes(ids[i]), 0n, hammer, bytes(record)), 0));
        // The JS thread (the probe's owner) calls all the while the other two do.
        let own = 0, sum = 0n;
        do {
          for (let i = 0; i < 1000; i++) sum += libc.labs(-7n);
          own += 1000;
        } while (shared() < 2 * Number(n));
        for (const id of ids) libc.pthread_join(id[0], 0n);
        assert.deepEqual(records.map((r) => r[2]), [5n * n, 5n * n], "each thread got labs(-5) = 5 every time");
        assert.equal(sum, 7n * BigInt(own), "the JS thread got labs(-7) = 7 every time");
        const { calls, timed } = probe.read();
        assert.equal(calls, 2 * Number(n) + own, "no call lost");
        assert.equal(Number(record[PROBE_RECORD.ownCalls / 8]), own, "the owner's calls on its own counter");
        assert.equal(shared(), 2 * Number(n), "the other threads' on the shared one");
        assert.equal(probe.patch.calls, calls, "the patch's count is both");
        if (timing) assert.ok(timed > 0 && timed <= calls, `${timed} timed`);
      } finally {
        probe.restore();
      }
    }
  } finally {
    unassemble(base);
  }
});
