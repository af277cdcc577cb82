/**
 * The fake clock. Its native code: every instruction read back with the reference disassemblers
 * (iced-x86; objdump for aarch64), for System V, Windows x64 and AAPCS64, frozen and running; then
 * this machine's code placed in executable memory and called through FFI: the fake times each
 * function reports, the clocks it leaves real, and the counter. `FakeClock`'s state word alone.
 * Then `fakeClock()` on the live process: process-wide (the program's calls, a native thread, the
 * runtime's `Date.now()`), inside transactions, and with `callers` (a generated library, libsqlite3).
 */
import { assert, assertCode, test } from "./harness.ts";
import { assertDisassembly, h } from "./objdump_aarch64.ts";
import { cannedCode as x86_64Code } from "../src/arch/x86_64/canned.ts";
import { cannedCode as aarch64Code } from "../src/arch/aarch64/canned.ts";
import type { ClockFunction } from "../src/arch/canned.ts";
import { RedefineError } from "../src/errors.ts";
import { transaction } from "../src/transaction.ts";
import { redefine } from "../src/redefine.ts";
import { FakeClock, fakeClock, fakeClockOf, POSIX_UNITS, WINDOWS_UNITS } from "../src/mock/clock.ts";
import type { ClockBackend } from "../src/mock/clock.ts";
import { callable, countListing, disassemble, place, placeCode } from "./canned_listing.ts";
import { bytesAt, isArm64, libc, mapPages, os, runtime, words } from "./native.ts";
import { IMPORTS, loadImportLibrary } from "./import_library.ts";
import { imports, modules } from "../src/introspect.ts";

const AT = 0x7f00_0000_1000n;
const DATA = 0x7f00_0000_2230n;
const STATE = 0x5555_0000_0040n;

function x86(fn: ClockFunction, rate: 0 | 1, system = "linux"): string[] {
  return disassemble(x86_64Code({ kind: "clock", function: fn, rate, state: STATE }, system).encode(AT, DATA), AT);
}

const X86_COUNT = "lock add qword ptr [7F0000002230h],1h";
const X86_FROZEN = ["mov rax,555500000040h", "mov rax,[rax]"];
const X86_RUNNING = [
  "push rdi",
  "push rsi",
  "sub rsp,18h",
  "mov edi,1h",
  "mov rsi,rsp",
  "call qword ptr [7F0000002238h]",
  "mov rax,[rsp]",
  "imul rax,rax,3B9ACA00h",
  "add rax,[rsp+8h]",
  "add rsp,18h",
  "pop rsi",
  "pop rdi",
  "mov rcx,555500000040h",
  "add rax,[rcx]",
];
const X86_BY_1E9 = ["mov ecx,3B9ACA00h", "xor edx,edx", "div rcx"];

test("x86-64 time (System V): the fake seconds in rax and, given t, in *t", () => {
  const tail = (done: bigint) => [...X86_BY_1E9, "test rdi,rdi", `je ${done.toString(16).toUpperCase()}h`, "mov [rdi],rax", "ret"];
  assert.deepEqual(x86("time", 0), [X86_COUNT, ...X86_FROZEN, ...tail(AT + 0x28n)]);
  assert.deepEqual(x86("time", 1), [X86_COUNT, ...X86_RUNNING, ...tail(AT + 0x52n)]);
});

test("x86-64 gettimeofday (System V): tv from the fake time, tz zeroed, 0", () => {
  assert.deepEqual(x86("gettimeofday", 0), [
    X86_COUNT,
    ...X86_FROZEN,
    "test rdi,rdi",
    "je 7F0000001036h",
    "mov ecx,3E8h",
    "xor edx,edx",
    "div rcx",
    "mov ecx,0F4240h",
    "xor edx,edx",
    "div rcx",
    "mov [rdi],rax",
    "mov [rdi+8h],rdx",
    "test rsi,rsi",
    "je 7F0000001042h",
    "mov qword ptr [rsi],0h",
    "xor eax,eax",
    "ret",
  ]);
  assert.deepEqual(x86("gettimeofday", 1).slice(0, 16), [X86_COUNT, ...X86_RUNNING, "test rdi,rdi"]);
});

test("x86-64 clock_gettime (System V): CLOCK_REALTIME and _COARSE faked, every other clock to the original", () => {
  const fake = (at: number) => [
    "test rsi,rsi",
    `je 7F00000010${(at).toString(16).toUpperCase()}h`,
    ...X86_BY_1E9,
    "mov [rsi],rax",
    "mov [rsi+8h],rdx",
    "xor eax,eax",
    "ret",
    "mov eax,0FFFFFFFFh",
    "ret",
  ];
  const dispatch = [
    X86_COUNT,
    "test edi,edi",
    "je 7F0000001018h",
    "cmp edi,5h",
    "je 7F0000001018h",
    "jmp qword ptr [7F0000002238h]",
  ];
  assert.deepEqual(x86("clock_gettime", 0), [...dispatch, ...X86_FROZEN, ...fake(0x3e)]);
  assert.deepEqual(x86("clock_gettime", 1), [...dispatch, ...X86_RUNNING, ...fake(0x68)]);
  // macOS: 5 is CLOCK_MONOTONIC_RAW_APPROX there, and CLOCK_MONOTONIC is 6.
  assert.deepEqual(x86("clock_gettime", 0, "darwin").slice(0, 4), [
    X86_COUNT,
    "test edi,edi",
    "je 7F0000001013h",
    "jmp qword ptr [7F0000002238h]",
  ]);
  assert.equal(x86("clock_gettime", 1, "darwin")[7], "mov edi,6h");
});

test("x86-64 GetSystemTime[Precise]AsFileTime (Windows x64): the FILETIME at rcx, shadow space at the call", () => {
  for (const fn of ["GetSystemTimeAsFileTime", "GetSystemTimePreciseAsFileTime"] as const) {
    assert.deepEqual(x86(fn, 0, "windows"), [X86_COUNT, ...X86_FROZEN, "mov [rcx],rax", "ret"]);
    assert.deepEqual(x86(fn, 1, "windows"), [
      X86_COUNT,
      "push rcx",
      "sub rsp,30h",
      "lea rcx,[rsp+20h]",
      "call qword ptr [7F0000002238h]",
      "mov rax,[rsp+20h]",
      "add rsp,30h",
      "pop rcx",
      "mov rdx,555500000040h",
      "add rax,[rdx]",
      "mov [rcx],rax",
      "ret",
    ]);
  }
});

test("clock functions of another system are refused", () => {
  const refused = (fn: ClockFunction, system: string) =>
    assert.throws(() => x86_64Code({ kind: "clock", function: fn, rate: 0, state: STATE }, system), RedefineError);
  refused("time", "windows");
  refused("GetSystemTimeAsFileTime", "linux");
  assert.throws(() => aarch64Code({ kind: "clock", function: "gettimeofday", rate: 0, state: STATE }, "windows"), RedefineError);
});

function arm(fn: ClockFunction, rate: 0 | 1, system = "linux"): Uint8Array {
  return aarch64Code({ kind: "clock", function: fn, rate, state: STATE }, system).encode(AT, DATA);
}

/** The fake time into x9, with the state literal at `literal`. */
function armNow(rate: 0 | 1, literal: bigint, monotonic = 1): string[] {
  if (rate === 0) return [`ldr x10, ${h(literal)}`, "ldr x9, [x10]"];
  return [
    "stp x29, x30, [sp, #-48]!",
    "mov x29, sp",
    "stp x0, x1, [sp, #16]",
    `mov x0, #${h(monotonic)}`,
    "add x1, sp, #0x20",
    "ldr x16, [x16, #8]",
    "blr x16",
    "ldp x9, x10, [sp, #32]",
    "mov x11, #0xca00",
    "movk x11, #0x3b9a, lsl #16",
    "madd x9, x9, x11, x10",
    "ldp x0, x1, [sp, #16]",
    "ldp x29, x30, [sp], #48",
    `ldr x10, ${h(literal)}`,
    "ldr x10, [x10]",
    "add x9, x9, x10",
  ];
}

const COUNT = countListing(AT, DATA);
const BY_1E9 = ["mov x11, #0xca00", "movk x11, #0x3b9a, lsl #16", "udiv x10, x9, x11"];

test("aarch64 time: the fake seconds in x0 and, given t, in *t", () => {
  const tail = (cbz: bigint) => [...BY_1E9, `cbz x0, ${h(cbz + 8n)}`, "str x10, [x0]", "mov x0, x10", "ret"];
  assertDisassembly(arm("time", 0), AT, [...COUNT, ...armNow(0, AT + 0x40n), ...tail(AT + 0x2cn), "nop", { quad: STATE }]);
  assertDisassembly(arm("time", 1), AT, [...COUNT, ...armNow(1, AT + 0x78n), ...tail(AT + 0x64n), "nop", { quad: STATE }]);
});

test("aarch64 gettimeofday: tv from the fake time, tz zeroed, 0", () => {
  assertDisassembly(arm("gettimeofday", 0), AT, [
    ...COUNT,
    ...armNow(0, AT + 0x50n),
    `cbz x0, ${h(AT + 0x40n)}`,
    "mov x11, #0x3e8",
    "udiv x10, x9, x11",
    "mov x11, #0x4240",
    "movk x11, #0xf, lsl #16",
    "udiv x12, x10, x11",
    "msub x13, x12, x11, x10",
    "stp x12, x13, [x0]",
    `cbz x1, ${h(AT + 0x48n)}`,
    "str xzr, [x1]",
    "mov w0, #0x0",
    "ret",
    { quad: STATE },
  ]);
});

test("aarch64 clock_gettime: CLOCK_REALTIME and _COARSE faked, every other clock to the original", () => {
  const tail = (at: bigint) => [
    `cbz x1, ${h(at + 0x20n)}`,
    ...BY_1E9,
    "msub x12, x10, x11, x9",
    "stp x10, x12, [x1]",
    "mov w0, #0x0",
    "ret",
    "mov w0, #0xffffffff",
    "ret",
  ];
  const dispatch = [`cbz w0, ${h(AT + 0x2cn)}`, "cmp w0, #0x5", `b.eq ${h(AT + 0x2cn)}`, "ldr x16, [x16, #8]", "br x16"];
  assertDisassembly(arm("clock_gettime", 0), AT, [
    ...COUNT,
    ...dispatch,
    ...armNow(0, AT + 0x60n),
    ...tail(AT + 0x34n),
    "nop",
    { quad: STATE },
  ]);
  assertDisassembly(arm("clock_gettime", 1), AT, [
    ...COUNT,
    ...dispatch,
    ...armNow(1, AT + 0x98n),
    ...tail(AT + 0x6cn),
    "nop",
    { quad: STATE },
  ]);
  assertDisassembly(arm("clock_gettime", 1, "darwin"), AT, [
    ...COUNT,
    `cbz w0, ${h(AT + 0x24n)}`,
    "ldr x16, [x16, #8]",
    "br x16",
    ...armNow(1, AT + 0x90n, 6),
    ...tail(AT + 0x64n),
    "nop",
    { quad: STATE },
  ]);
});

test("aarch64 GetSystemTime[Precise]AsFileTime: the FILETIME at x0", () => {
  assertDisassembly(arm("GetSystemTimeAsFileTime", 0, "windows"), AT, [
    ...COUNT,
    `ldr x10, ${h(AT + 0x28n)}`,
    "ldr x9, [x10]",
    "str x9, [x0]",
    "ret",
    { quad: STATE },
  ]);
  assertDisassembly(arm("GetSystemTimePreciseAsFileTime", 1, "windows"), AT, [
    ...COUNT,
    "stp x29, x30, [sp, #-48]!",
    "mov x29, sp",
    "stp x0, x1, [sp, #16]",
    "add x0, sp, #0x20",
    "ldr x16, [x16, #8]",
    "blr x16",
    "ldr x9, [sp, #32]",
    "ldp x0, x1, [sp, #16]",
    "ldp x29, x30, [sp], #48",
    `ldr x10, ${h(AT + 0x50n)}`,
    "ldr x10, [x10]",
    "add x9, x9, x10",
    "str x9, [x0]",
    "ret",
    { quad: STATE },
  ]);
});

// Live: the code of this machine, called through FFI.

const page = mapPages(1);
const memory = runtime.view(page, 4096);
const word = (offset: number) => new BigInt64Array(memory.buffer, memory.byteOffset + offset, 2);
const state = word(0);
const realClock = os.symbolAddress("clock_gettime");
const clockGettime = callable(realClock, { parameters: ["i32", "pointer"], result: "i32" }) as (id: number, ts: bigint) => number;

/** CLOCK_MONOTONIC in ns, read by the real clock_gettime. */
function monotonicNs(): bigint {
  assert.equal(clockGettime(1, page + 64n), 0);
  const [sec, nsec] = word(64);
  return sec * 1_000_000_000n + nsec;
}

/** The code of `fn` placed with the state word in `page` and the real clock_gettime as its original. */
function clock(fn: ClockFunction, rate: 0 | 1) {
  const placed = place({ kind: "clock", function: fn, rate, state: page }, "linux");
  placed.setOriginal(realClock);
  return placed;
}

const AT_NS = 1_000_000_000_123_456_789n; // 2001-09-09T01:46:40.123456789Z

test("live fake clock, frozen: time, gettimeofday, clock_gettime report the state word", () => {
  Atomics.store(state, 0, AT_NS);
  const t = clock("time", 0);
  const time = callable(t.address, { parameters: ["pointer"], result: "i64" });
  assert.equal(time(0n), 1_000_000_000n);
  word(128).fill(0n);
  assert.equal(time(page + 128n), 1_000_000_000n);
  assert.equal(word(128)[0], 1_000_000_000n, "*t");
  assert.equal(t.calls(), 2n);

  const g = clock("gettimeofday", 0);
  const gettimeofday = callable(g.address, { parameters: ["pointer", "pointer"], result: "i32" });
  word(128).fill(-1n);
  word(144).fill(-1n);
  assert.equal(gettimeofday(page + 128n, page + 144n), 0);
  assert.deepEqual([...word(128)], [1_000_000_000n, 123_456n], "tv_sec, tv_usec");
  assert.equal(word(144)[0], 0n, "tz zeroed");
  assert.equal(gettimeofday(0n, 0n), 0, "both NULL");

  const c = clock("clock_gettime", 0);
  const fake = callable(c.address, { parameters: ["i32", "pointer"], result: "i32" });
  for (const id of [0, 5]) {
    word(128).fill(0n);
    assert.equal(fake(id, page + 128n), 0);
    assert.deepEqual([...word(128)], [1_000_000_000n, 123_456_789n], `clock ${id}`);
  }
  assert.equal(fake(0, 0n), -1, "no timespec");
  const before = monotonicNs();
  assert.equal(fake(1, page + 128n), 0);
  const [sec, nsec] = word(128);
  const monotonic = sec * 1_000_000_000n + nsec;
  assert.ok(monotonic >= before && monotonic <= monotonicNs(), "CLOCK_MONOTONIC goes to the original");
  assert.equal(fake(99, page + 128n), -1, "an invalid clock: the original's answer");
  assert.equal(c.calls(), 5n);

  Atomics.store(state, 0, AT_NS + 86_400_000_000_000n);
  assert.equal(time(0n), 1_000_086_400n, "a new state word is seen at once");
});

test("live macOS clock_gettime code: only clock 0 is faked (5 is a monotonic clock there), the pace read from clock 6", () => {
  Atomics.store(state, 0, AT_NS);
  const c = place({ kind: "clock", function: "clock_gettime", rate: 0, state: page }, "darwin");
  c.setOriginal(realClock);
  const fake = callable(c.address, { parameters: ["i32", "pointer"], result: "i32" });
  assert.equal(fake(0, page + 128n), 0);
  assert.equal(word(128)[0], 1_000_000_000n);
  assert.equal(fake(5, page + 128n), 0);
  assert.ok(word(128)[0] > 1_700_000_000n, "clock 5 reached the original (here: Linux's CLOCK_REALTIME_COARSE)");
  const running = place({ kind: "clock", function: "time", rate: 1, state: page }, "darwin");
  running.setOriginal(realClock);
  Atomics.store(state, 0, 0n);
  const seconds = callable(running.address, { parameters: ["pointer"], result: "i64" })(0n) as bigint;
  // Clock 6 is Linux's CLOCK_MONOTONIC_COARSE: the same seconds as CLOCK_MONOTONIC, give or take a tick.
  const monotonic = monotonicNs() / 1_000_000_000n;
  assert.ok(seconds >= monotonic - 1n && seconds <= monotonic, `${seconds} ~ ${monotonic}`);
});

test("live fake clock, running: the state word plus CLOCK_MONOTONIC, read through the original", () => {
  const offset = AT_NS - monotonicNs();
  Atomics.store(state, 0, offset);
  const c = clock("clock_gettime", 1);
  const fake = callable(c.address, { parameters: ["i32", "pointer"], result: "i32" });
  const before = monotonicNs();
  assert.equal(fake(0, page + 128n), 0);
  const after = monotonicNs();
  const [sec, nsec] = word(128);
  const now = sec * 1_000_000_000n + nsec;
  assert.ok(now >= before + offset && now <= after + offset, `${now} within [${before + offset}, ${after + offset}]`);

  const t = clock("time", 1);
  const seconds = callable(t.address, { parameters: ["pointer"], result: "i64" })(0n) as bigint;
  assert.ok(seconds >= (monotonicNs() + offset) / 1_000_000_000n - 1n && seconds <= (monotonicNs() + offset) / 1_000_000_000n);

  const g = clock("gettimeofday", 1);
  const low = (monotonicNs() + offset) / 1000n;
  assert.equal(callable(g.address, { parameters: ["pointer", "pointer"], result: "i32" })(page + 128n, 0n), 0);
  const high = (monotonicNs() + offset) / 1000n;
  const [s, us] = word(128);
  assert.ok(us < 1_000_000n);
  assert.ok(s * 1_000_000n + us >= low && s * 1_000_000n + us <= high, "tv within the readings around it");
});

// The Windows FILETIME code, called from here: an adapter gives it the pointer in rcx (x86-64; on
// arm64 the conventions agree), and a stand-in for the precise system time returns 1000.
const windowsCall = isArm64 ? (code: bigint) => code : (code: bigint) =>
  placeCode(Uint8Array.of(
    0x48, 0x89, 0xf9, //            mov rcx, rdi
    0x48, 0x83, 0xec, 0x28, //      sub rsp, 40: shadow space, alignment
    0x48, 0xb8, ...new Uint8Array(new BigUint64Array([code]).buffer), // mov rax, code
    0xff, 0xd0, //                  call rax
    0x48, 0x83, 0xc4, 0x28, //      add rsp, 40
    0xc3, //                        ret
  ));
const preciseStandIn = placeCode(Uint8Array.from(
  isArm64
    ? words(
      0xd2807d09, // mov x9, #1000
      0xf9000009, // str x9, [x0]
      0xd65f03c0, // ret
    )
    : [
      0x48, 0xc7, 0x01, 0xe8, 0x03, 0, 0, // mov qword [rcx], 1000
      0xc3, //                               ret
    ],
));

test("live Windows clock code: the FILETIME frozen, and running on the precise time", () => {
  const FILETIME = 0x01d2_3456_789a_bcden;
  Atomics.store(state, 0, FILETIME);
  for (const rate of [0, 1] as const) {
    const placed = place({ kind: "clock", function: "GetSystemTimePreciseAsFileTime", rate, state: page }, "windows");
    placed.setOriginal(preciseStandIn);
    const call = callable(windowsCall(placed.address), { parameters: ["pointer"], result: "void" });
    word(128).fill(0n);
    call(page + 128n);
    assert.equal(word(128)[0], FILETIME + (rate === 1 ? 1000n : 0n));
    assert.equal(placed.calls(), 1n);
  }
});


// The JS side alone, on a state word of its own and a real clock the test moves.

function backend(units: ClockBackend["units"] = POSIX_UNITS) {
  const log: string[] = [];
  let real = 5_000n;
  return {
    log,
    tick: (by: bigint) => (real += by),
    backend: {
      state: new BigInt64Array(1),
      real: () => real,
      units,
      restore: () => log.push("restored"),
    },
  };
}

test("FakeClock frozen: the state word is the time in ns; set and advance store it", () => {
  const { backend: b, tick, log } = backend();
  const clock = new FakeClock(b, 0, Date.UTC(2001, 8, 9, 1, 46, 40));
  assert.equal(b.state[0], 1_000_000_000_000_000_000n);
  assert.equal(clock.now(), 1_000_000_000_000);
  tick(10_000_000_000n);
  assert.equal(clock.now(), 1_000_000_000_000, "frozen: the real clock does not move it");
  clock.advance(86_400_000);
  assert.equal(b.state[0], 1_000_086_400_000_000_000n);
  clock.advance(0.5);
  assert.equal(b.state[0], 1_000_086_400_000_500_000n, "half a millisecond, in ns");
  clock.set(new Date(0));
  assert.equal(b.state[0], 0n);
  assert.throws(() => clock.advance(-1), (e: RedefineError) => e.code === "BAD_REPLACEMENT" && /1970 to 2262/.test(e.message));
  assert.equal(b.state[0], 0n, "a refused advance stores nothing");
  clock.restore();
  clock.restore();
  assert.deepEqual(log, ["restored"], "restored once");
  assert.equal(clock.active, false);
  assert.throws(() => clock.set(1), (e: RedefineError) => e.code === "RESTORED");
  assert.throws(() => clock.now(), (e: RedefineError) => e.code === "RESTORED");
});

test("FakeClock running: the state word is the offset from the real clock", () => {
  const { backend: b, tick } = backend();
  const clock = new FakeClock(b, 1, 1_000);
  assert.equal(b.state[0], 1_000_000_000n - 5_000n);
  assert.equal(clock.now(), 1_000);
  tick(2_000_000_000n);
  assert.equal(clock.now(), 3_000, "runs with the real clock");
  clock.set(10_000);
  assert.equal(clock.now(), 10_000);
  tick(1_000_000n);
  clock.advance(500);
  assert.equal(clock.now(), 10_501);
});

test("FakeClock on Windows: FILETIME units since 1601", () => {
  const { backend: b } = backend(WINDOWS_UNITS);
  const clock = new FakeClock(b, 0, Date.UTC(2001, 8, 9, 1, 46, 40));
  assert.equal(b.state[0], (1_000_000_000_000n + 11_644_473_600_000n) * 10_000n);
  assert.equal(clock.now(), 1_000_000_000_000);
  clock.advance(1);
  assert.equal(b.state[0], (1_000_000_000_001n + 11_644_473_600_000n) * 10_000n);
});

test("FakeClock refuses times the clock functions cannot report", () => {
  for (const at of [-1, Number.NaN, Infinity, new Date(Number.NaN), 1e16, "2001" as unknown as number]) {
    assert.throws(() => new FakeClock(backend().backend, 0, at), (e: RedefineError) => e.code === "BAD_REPLACEMENT");
  }
});

// fakeClock() on the live process.

const libcClock = runtime.open("libc.so.6", { clock_gettime: { parameters: ["i32", "pointer"], result: "i32" } });
const timespec = mapPages(1);

/** The two 64-bit words at `address` (a timespec, a timeval). */
function pairAt(address: bigint): bigint[] {
  const view = runtime.view(address, 16);
  return [...new BigInt64Array(view.buffer, view.byteOffset, 2)];
}

/** The program's own FFI call of libc's clock_gettime(id): ns. */
function clockNs(id: number): bigint {
  assert.equal(libcClock.clock_gettime(id, timespec), 0);
  const [sec, nsec] = pairAt(timespec);
  return sec * 1_000_000_000n + nsec;
}

test("fakeClock on libc's clock_gettime, process-wide: CLOCK_REALTIME frozen, advanced, set; the monotonic clock real; restored exactly", () => {
  const entry = os.symbolAddress("clock_gettime");
  const before = bytesAt(entry, 16);
  const clock = fakeClockOf(["clock_gettime"], { at: Date.UTC(2001, 8, 9, 1, 46, 40) });
  try {
    assert.equal(clockNs(0), 1_000_000_000_000_000_000n);
    assert.equal(clockNs(5), 1_000_000_000_000_000_000n, "CLOCK_REALTIME_COARSE");
    const m0 = monotonicNs();
    const m = clockNs(1);
    assert.ok(m >= m0 && m <= monotonicNs(), "CLOCK_MONOTONIC stays real");
    clock.advance(86_400_000);
    assert.equal(clockNs(0), 1_000_086_400_000_000_000n);
    assert.equal(clock.now(), 1_000_086_400_000);
    clock.set(new Date("2030-01-01T00:00:00Z"));
    assert.equal(clockNs(0) / 1_000_000n, BigInt(Date.UTC(2030, 0, 1)));
  } finally {
    clock.restore();
  }
  assert.deepEqual(bytesAt(entry, 16), before, "the entry's bytes exactly back");
  const real = clockNs(0) / 1_000_000n;
  assert.ok(real > BigInt(Date.UTC(2025, 0, 1)) && real < BigInt(Date.UTC(2030, 0, 1)), `real time again: ${real}`);
  assertCode(() => clock.advance(1), "RESTORED");
});

test("fakeClock at rate 1: the fake time runs at the real pace from 'at'", () => {
  const at = Date.UTC(2001, 8, 9, 1, 46, 40);
  using clock = fakeClockOf(["clock_gettime"], { at, rate: 1 });
  const first = clockNs(0);
  const m0 = monotonicNs();
  while (monotonicNs() - m0 < 20_000_000n); // 20 ms of real time
  const second = clockNs(0);
  assert.ok(first >= BigInt(at) * 1_000_000n && first < BigInt(at + 10_000) * 1_000_000n, `started at 'at': ${first}`);
  assert.ok(second - first >= 20_000_000n && second - first < 10_000_000_000n, `ran on: ${second - first} ns`);
  const now = clock.now();
  assert.ok(now >= Number(second / 1_000_000n) && now < at + 10_000, `now() agrees: ${now}`);
});

test("fakeClock inside an enclosing transaction: live when it commits, gone with it when it fails", () => {
  const at = Date.UTC(2001, 8, 9, 1, 46, 40);
  const clock = transaction(() => fakeClockOf(["clock_gettime"], { at }));
  assert.equal(clockNs(0), 1_000_000_000_000_000_000n);
  transaction(() => clock.restore());
  assert.ok(clockNs(0) > 1_700_000_000_000_000_000n, "restored when the transaction committed");
  const entry = bytesAt(os.symbolAddress("clock_gettime"), 16);
  assert.throws(() =>
    transaction(() => {
      fakeClockOf(["clock_gettime"], { at });
      throw new Error("later in the transaction");
    }), /later in the transaction/);
  assert.deepEqual(bytesAt(os.symbolAddress("clock_gettime"), 16), entry, "nothing written");
  assert.ok(clockNs(0) > 1_700_000_000_000_000_000n);
});

test("a nested transaction that throws after a fake clock was made in the outer one rolls back its own patch only (the clock's bookkeeping has no write of its own)", () => {
  const at = Date.UTC(2001, 8, 9, 1, 46, 40);
  const entries = [os.symbolAddress("clock_gettime"), os.symbolAddress("labs")];
  const before = entries.map((entry) => bytesAt(entry, 16));
  const clock = transaction(() => {
    const made = fakeClockOf(["clock_gettime"], { at });
    assert.throws(() =>
      transaction(() => {
        redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, () => 1n);
        throw new Error("inner fails");
      }), /inner fails/);
    return made;
  });
  try {
    assert.equal(clockNs(0), 1_000_000_000_000_000_000n, "the clock is live");
    assert.equal(libc.labs(-3n), 3n, "the inner patch is not");
  } finally {
    clock.restore();
  }
  assert.deepEqual(entries.map((entry) => bytesAt(entry, 16)), before, "both entries exactly back");
});

test("fakeClock(): time, gettimeofday and clock_gettime for the program's FFI calls, a native thread and the runtime's Date.now(); restored exactly", () => {
  const libcTime = runtime.open("libc.so.6", {
    time: { parameters: ["pointer"], result: "i64" },
    gettimeofday: { parameters: ["pointer", "pointer"], result: "i32" },
  });
  const entries = ["time", "gettimeofday", "clock_gettime"].map((name) => os.symbolAddress(name));
  const before = entries.map((entry) => bytesAt(entry, 16));
  const clock = fakeClock({ at: Date.UTC(2001, 8, 9, 1, 46, 40) });
  try {
    assert.equal(libcTime.time(0n), 1_000_000_000n);
    assert.equal(libcTime.gettimeofday(timespec, 0n), 0);
    assert.deepEqual(pairAt(timespec), [1_000_000_000n, 0n], "tv_sec, tv_usec");
    assert.equal(clockNs(0), 1_000_000_000_000_000_000n);
    // A native thread started on time(t): its exit value is the seconds, and so is *t.
    const id = new BigUint64Array(1);
    const t = new BigInt64Array(1);
    assert.equal(libc.pthread_create(new Uint8Array(id.buffer), 0n, entries[0], new Uint8Array(t.buffer)), 0);
    assert.equal(libc.pthread_join(id[0], timespec), 0);
    assert.deepEqual([pairAt(timespec)[0], t[0]], [1_000_000_000n, 1_000_000_000n], "on a native thread");
    assert.equal(Date.now(), 1_000_000_000_000, "the runtime's own Date.now()");
    clock.advance(86_400_000);
    assert.equal(libcTime.time(0n), 1_000_086_400n);
    assert.equal(Date.now(), 1_000_086_400_000);
  } finally {
    clock.restore();
  }
  assert.deepEqual(entries.map((entry) => bytesAt(entry, 16)), before, "every entry's bytes exactly back");
  const real = libcTime.time(0n) as bigint;
  assert.ok(real * 1000n >= BigInt(Date.now()) - 2000n && real * 1000n <= BigInt(Date.now()), `real again: ${real}`);
});

test("fakeClock refuses a rate other than 0 and 1, and a time it cannot report", () => {
  assertCode(() => fakeClock({ rate: 2 }), "BAD_REPLACEMENT", /rate is 2; it must be 0 \(frozen at 'at'\) or 1/);
  assertCode(() => fakeClock({ at: -1 }), "BAD_REPLACEMENT", /'at': -1 is not a time from 1970 to 2262/);
});

// fakeClock({ callers }): only the named library sees the fake time.

const importer = loadImportLibrary(runtime, os, "fake_clock_");

test("fakeClock with callers: the library's time, gettimeofday and clock_gettime are fake, the program's real; its slots come back exactly", () => {
  const slots = IMPORTS.slice(0, 3).map((_, i) => BigInt(importer.library.slotOffset(i)));
  const base = modules().find((m) => m.path === importer.path)!.base;
  const before = slots.map((offset) => bytesAt(base + offset, 8));
  const clock = fakeClock({ at: Date.UTC(2001, 8, 9, 1, 46, 40), callers: importer.path });
  try {
    assert.equal(importer.time(), 1_000_000_000n);
    const tv = new BigInt64Array(2);
    assert.equal(importer.gettimeofday(new Uint8Array(tv.buffer)), 0);
    assert.deepEqual([...tv], [1_000_000_000n, 0n]);
    const ts = new BigInt64Array(2);
    assert.equal(importer.clockGettime(0, new Uint8Array(ts.buffer)), 0);
    assert.deepEqual([...ts], [1_000_000_000n, 0n]);
    assert.equal(importer.clockGettime(1, new Uint8Array(ts.buffer)), 0);
    assert.ok(ts[0] * 1_000_000_000n + ts[1] <= monotonicNs(), "its monotonic clock stays real");
    const real = clockNs(0) / 1_000_000n;
    assert.ok(real > BigInt(Date.UTC(2025, 0, 1)), "the program's own clock_gettime is real");
    assert.ok(Date.now() > Date.UTC(2025, 0, 1), "and so is the runtime's Date.now()");
    clock.advance(86_400_000);
    assert.equal(importer.time(), 1_000_086_400n);
  } finally {
    clock.restore();
  }
  assert.deepEqual(slots.map((offset) => bytesAt(base + offset, 8)), before, "the import slots exactly back");
  assert.ok(importer.time() > 1_700_000_000n, "the library's time is real again");
});

test("fakeClock with callers that import no clock function: NOT_IMPORTED, nothing written", () => {
  assertCode(() => fakeClock({ callers: "libc.so.6" }), "NOT_IMPORTED", /'libc\.so\.6' import none of clock_gettime, time, gettimeofday/);
  assertCode(() => fakeClock({ callers: "libnot-loaded.so.3" }), "LIBRARY_NOT_FOUND");
});

/** libsqlite3, where it is installed (it is optional: the test reports itself skipped without it). */
function openSqlite() {
  try {
    return runtime.open("libsqlite3.so.0", {
      sqlite3_open: { parameters: ["buffer", "buffer"], result: "i32" },
      sqlite3_prepare_v2: { parameters: ["pointer", "buffer", "i32", "buffer", "pointer"], result: "i32" },
      sqlite3_step: { parameters: ["pointer"], result: "i32" },
      sqlite3_column_int64: { parameters: ["pointer", "i32"], result: "i64" },
      sqlite3_finalize: { parameters: ["pointer"], result: "i32" },
      sqlite3_close: { parameters: ["pointer"], result: "i32" },
    });
  } catch (error) {
    if (error instanceof RedefineError && error.code === "LIBRARY_NOT_FOUND") return null;
    throw error;
  }
}
const sqlite = openSqlite();

test("fakeClock({ callers: \"libsqlite3.so.0\" }): strftime('%s','now') is 1000000000, a day later 1000086400; Date.now() real; the GOT exactly back", () => {
  const s = sqlite!;
  const handle = new BigUint64Array(1);
  assert.equal(s.sqlite3_open(new TextEncoder().encode(":memory:\0"), new Uint8Array(handle.buffer)), 0);
  const seconds = () => {
    const statement = new BigUint64Array(1);
    assert.equal(s.sqlite3_prepare_v2(handle[0], new TextEncoder().encode("SELECT strftime('%s','now')\0"), -1, new Uint8Array(statement.buffer), 0n), 0);
    assert.equal(s.sqlite3_step(statement[0]), 100); // SQLITE_ROW
    const value = s.sqlite3_column_int64(statement[0], 0) as bigint;
    s.sqlite3_finalize(statement[0]);
    return value;
  };
  const slots = imports("libsqlite3.so.0").filter((i) => ["time", "gettimeofday", "clock_gettime"].includes(i.name));
  assert.ok(slots.length > 0, "libsqlite3 imports a clock function");
  const before = slots.map((i) => bytesAt(i.slot, 8));
  const clock = fakeClock({ at: Date.UTC(2001, 8, 9, 1, 46, 40), callers: "libsqlite3.so.0" });
  try {
    assert.equal(seconds(), 1_000_000_000n);
    assert.ok(Date.now() > Date.UTC(2025, 0, 1), "Date.now() stays real");
    clock.advance(86_400_000);
    assert.equal(seconds(), 1_000_086_400n);
    assert.ok(Date.now() > Date.UTC(2025, 0, 1), "Date.now() stays real");
  } finally {
    clock.restore();
  }
  assert.deepEqual(slots.map((i) => bytesAt(i.slot, 8)), before, "the GOT bytes exactly back");
  assert.ok(seconds() * 1000n > BigInt(Date.now()) - 2000n, "sqlite's clock is real again");
  s.sqlite3_close(handle[0]);
}, { skip: sqlite ? undefined : "libsqlite3.so.0 is not installed" });

test("the pages are given back", () => {
  assert.equal(libc.munmap(page, 4096n), 0);
  assert.equal(libc.munmap(timespec, 4096n), 0);
});
