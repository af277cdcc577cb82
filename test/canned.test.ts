/**
 * The canned replacements `returns` and `sequence`: every instruction read back with the reference
 * disassemblers (iced-x86; objdump for aarch64), then this machine's code placed in executable
 * memory and called through FFI: the values of each result type, the native call counter, and
 * distinct steps for callers on other threads. Then through `redefine()`: on a live function, a
 * native thread, stacking, `callers`, and the values refused.
 */
import { assert, assertCode, test } from "./harness.ts";
import { assertDisassembly, h } from "./objdump_aarch64.ts";
import { cannedCode as x86_64Code } from "../src/arch/x86_64/canned.ts";
import { cannedCode as aarch64Code } from "../src/arch/aarch64/canned.ts";
import type { CannedValue } from "../src/arch/canned.ts";
import { callable, countListing, disassemble, f32, f64, integer, place, quads } from "./canned_listing.ts";
import { bytesAt, libc, mapPages, os, runtime } from "./native.ts";
import { redefine } from "../mod.ts";
import { loadImportLibrary } from "./import_library.ts";
import type { NativeType } from "../src/signature.ts";
import { cannedSpec, cannedValue, isCanned, returns, sequence } from "../src/mock/canned.ts";
import type { RedefineError } from "../src/errors.ts";

const AT = 0x7f00_0000_1000n;
const DATA = 0x7f00_0000_2230n;

test("x86-64 returns: count with lock add, the value into rax or xmm0, ret", () => {
  const code = (value: CannedValue) => x86_64Code({ kind: "returns", value }, "linux").encode(AT, DATA);
  assert.deepEqual(disassemble(code(integer(42n)), AT), [
    "lock add qword ptr [7F0000002230h],1h",
    "mov rax,2Ah",
    "ret",
  ]);
  assert.deepEqual(disassemble(code(integer(-1n)), AT)[1], "mov rax,0FFFFFFFFFFFFFFFFh");
  assert.deepEqual(disassemble(code(f64(1.5)), AT).slice(1), ["mov rax,3FF8000000000000h", "movq xmm0,rax", "ret"]);
  assert.deepEqual(disassemble(code(f32(1.5)), AT).slice(1), ["mov rax,3FC00000h", "movd xmm0,eax", "ret"]);
});

test("x86-64 sequence: lock xadd takes the step, clamped to the last, from the table after the code", () => {
  const values = [10n, 20n, 30n].map(integer);
  const plan = x86_64Code({ kind: "sequence", values }, "linux");
  const code = plan.encode(AT, DATA);
  assert.equal(code.length, plan.size);
  assert.deepEqual(disassemble(code, AT, 0x27), [
    "mov eax,1h",
    "lock xadd [7F0000002230h],rax",
    "cmp rax,2h",
    "jb 7F000000101Bh",
    "mov eax,2h",
    "lea rcx,[7F0000001028h]",
    "mov rax,[rcx+rax*8]",
    "ret",
  ]);
  assert.deepEqual(quads(code, 0x28), [10n, 20n, 30n], "the table at the lea's target");
  const floats = x86_64Code({ kind: "sequence", values: [f64(1), f64(2)] }, "linux").encode(AT, DATA);
  assert.equal(disassemble(floats, AT, 0x27)[6], "movsd xmm0,[rcx+rax*8]");
  const singles = x86_64Code({ kind: "sequence", values: [f32(1), f32(2)] }, "linux").encode(AT, DATA);
  assert.equal(disassemble(singles, AT, 0x27)[6], "movss xmm0,[rcx+rax*8]");
});

test("x86-64 returns and sequence ignore the arguments: the same bytes under Windows x64", () => {
  for (const spec of [{ kind: "returns", value: integer(7n) }, { kind: "sequence", values: [integer(1n)] }] as const) {
    assert.deepEqual(x86_64Code(spec, "windows").encode(AT, DATA), x86_64Code(spec, "linux").encode(AT, DATA));
  }
});

test("aarch64 returns: an ldxr/stxr counter loop, the value into x0, d0 or s0, ret", () => {
  const code = (value: CannedValue) => aarch64Code({ kind: "returns", value }, "linux").encode(AT, DATA);
  assertDisassembly(code(integer(42n)), AT, [...countListing(AT, DATA), "mov x0, #0x2a", "ret"]);
  assertDisassembly(code(integer(-2n)), AT, [
    ...countListing(AT, DATA),
    "mov x0, #0xfffe",
    "movk x0, #0xffff, lsl #16",
    "movk x0, #0xffff, lsl #32",
    "movk x0, #0xffff, lsl #48",
    "ret",
  ]);
  assertDisassembly(code(f64(1.5)), AT, [...countListing(AT, DATA), "mov x9, #0x3ff8000000000000", "fmov d0, x9", "ret"]);
  assertDisassembly(code(f32(-1)), AT, [...countListing(AT, DATA), "mov x9, #0xbf800000", "fmov s0, w9", "ret"]);
});

test("aarch64 sequence: the counter's old value is the step, clamped with csel, then the table", () => {
  const listing = (load: string) => [
    ...countListing(AT, DATA),
    "mov x9, #0x2",
    "cmp x17, x9",
    "csel x17, x17, x9, cc",
    `adr x16, ${h(AT + 0x38n)}`,
    "add x16, x16, x17, lsl #3",
    load,
    "ret",
    "nop",
  ];
  const values = [5n, 6n, -7n].map(integer);
  assertDisassembly(aarch64Code({ kind: "sequence", values }, "linux").encode(AT, DATA), AT, [
    ...listing("ldr x0, [x16]"),
    ...values.map((v) => ({ quad: v.bits })),
  ]);
  const doubles = [f64(0.5), f64(2), f64(3)];
  assertDisassembly(aarch64Code({ kind: "sequence", values: doubles }, "linux").encode(AT, DATA), AT, [
    ...listing("ldr d0, [x16]"),
    ...doubles.map((v) => ({ quad: v.bits })),
  ]);
  const singles = [f32(0.5), f32(2), f32(3)];
  assertDisassembly(aarch64Code({ kind: "sequence", values: singles }, "linux").encode(AT, DATA), AT, [
    ...listing("ldr s0, [x16]"),
    ...singles.map((v) => ({ quad: v.bits })),
  ]);
});

/** What a native caller gets back through FFI for canned `value` of `type`. */
function returned(type: NativeType, value: CannedValue, parameters: NativeType[] = [], args: unknown[] = []): unknown {
  const placed = place({ kind: "returns", value });
  const fn = callable(placed.address, { parameters, result: type });
  const first = fn(...args);
  assert.equal(fn(...args), first, "every call returns the same");
  assert.equal(placed.calls(), 2n, "the counter counted both calls");
  return first;
}

test("live returns: every result type reaches the native caller, and the counter counts", () => {
  assert.equal(returned("i32", integer(42n)), 42);
  assert.equal(returned("i32", integer(-7n)), -7);
  assert.equal(returned("u8", integer(200n)), 200);
  assert.equal(returned("i16", integer(-300n)), -300);
  assert.equal(returned("u32", integer(0xffff_fff0n)), 0xffff_fff0);
  assert.equal(returned("i64", integer(-(2n ** 62n))), -(2n ** 62n));
  assert.equal(returned("u64", integer(2n ** 64n - 1n)), 2n ** 64n - 1n);
  assert.equal(returned("u64", integer(0x7fff_dead_beefn)), 0x7fff_dead_beefn, "a pointer's bits");
  assert.equal(returned("bool", integer(1n)), true);
  assert.equal(returned("f64", f64(-2.25)), -2.25);
  assert.equal(returned("f32", f32(1.5)), 1.5);
  assert.equal(returned("i64", integer(9n), ["i64", "f64", "pointer"], [1n, 2.5, 0x1000n]), 9n, "arguments ignored");
});

test("live sequence: each call the next value, the last repeats; the counter counts every call", () => {
  const placed = place({ kind: "sequence", values: [1n, 2n, 3n].map(integer) });
  const fn = callable(placed.address, { parameters: [], result: "i32" });
  assert.deepEqual([fn(), fn(), fn(), fn(), fn()], [1, 2, 3, 3, 3]);
  assert.equal(placed.calls(), 5n);
  const doubles = place({ kind: "sequence", values: [f64(0.5), f64(-1)] });
  const g = callable(doubles.address, { parameters: [], result: "f64" });
  assert.deepEqual([g(), g(), g()], [0.5, -1, -1]);
  const singles = place({ kind: "sequence", values: [f32(0.25), f32(8)] });
  const k = callable(singles.address, { parameters: [], result: "f32" });
  assert.deepEqual([k(), k(), k()], [0.25, 8, 8]);
});

test("live sequence on native threads: each thread takes a distinct step", () => {
  const THREADS = 8;
  const values = Array.from({ length: THREADS }, (_, i) => BigInt(100 + i));
  const placed = place({ kind: "sequence", values: values.map(integer) });
  const results = mapPages(1);
  const ids = new BigUint64Array(THREADS);
  // Each thread runs the sequence itself as its start routine: its result is the thread's exit value.
  for (let i = 0; i < THREADS; i++) {
    const id = new Uint8Array(ids.buffer, i * 8, 8);
    assert.equal(libc.pthread_create(id, 0n, placed.address, new Uint8Array(8)), 0);
  }
  for (let i = 0; i < THREADS; i++) assert.equal(libc.pthread_join(ids[i], results + BigInt(i * 8)), 0);
  const view = runtime.view(results, THREADS * 8);
  const got = Array.from(new BigUint64Array(view.buffer, view.byteOffset, THREADS)).sort((a, b) => Number(a - b));
  assert.deepEqual(got, values);
  assert.equal(placed.calls(), BigInt(THREADS));
  libc.munmap(results, BigInt(4096));
});

test("returns() and sequence() values become the bits of the target's result type", () => {
  const bits = (type: NativeType, value: unknown) => cannedValue(type, value, "test");
  assert.deepEqual(bits("i32", -1), integer(-1n), "sign-extended");
  assert.deepEqual(bits("u32", 0xffff_ffff), integer(0xffff_ffffn), "zero-extended");
  assert.deepEqual(bits("i64", -5n), integer(-5n));
  assert.deepEqual(bits("u64", 2n ** 64n - 1n), integer(2n ** 64n - 1n));
  assert.deepEqual(bits("pointer", 0x7f00_1234n), integer(0x7f00_1234n));
  assert.deepEqual(bits("bool", true), integer(1n));
  assert.deepEqual(bits("void", undefined), integer(0n));
  assert.deepEqual(bits("f64", 1.5), f64(1.5));
  assert.deepEqual(bits("f32", 1.5), f32(1.5));
  assert.deepEqual(cannedSpec(returns(42), "i32"), { kind: "returns", value: integer(42n) });
  assert.deepEqual(cannedSpec(sequence(1, 2), "u8"), { kind: "sequence", values: [integer(1n), integer(2n)] });
  assert.equal(isCanned(returns(1)), true);
  assert.equal(isCanned({ symbol: "getpid" }), false);
});

test("values that do not fit the result type are refused with BAD_REPLACEMENT", () => {
  const refused = (type: NativeType, value: unknown, message: RegExp) =>
    assert.throws(() => cannedValue(type, value, "returns()"), (e: RedefineError) => e.code === "BAD_REPLACEMENT" && message.test(e.message));
  refused("u8", 256, /256 is not an integer from 0 to 2\^8 - 1, which a function returning u8 needs/);
  refused("i32", 2 ** 31, /from -2\^31 to 2\^31 - 1/);
  refused("u64", -1n, /-1n is not an integer from 0 to 2\^64 - 1/);
  refused("i32", 1.5, /1.5 is not an integer/);
  refused("i64", "7", /"7" is not/);
  refused("f64", 1n, /1n is not a number/);
  refused("bool", 1, /1 is not a boolean/);
  refused("void", 0, /0 is not undefined/);
  assert.throws(() => cannedSpec(sequence(1), "void"), (e: RedefineError) => e.code === "BAD_REPLACEMENT");
  assert.throws(() => cannedSpec(sequence(1, 2, 300), "u8"), (e: RedefineError) => /sequence\(\) value 2: 300/.test(e.message));
});

// Through redefine(): canned code as the replacement of a live function.

test("redefine with returns(42): the program's FFI call and a native thread started on getppid get 42; calls counts both", () => {
  const address = os.symbolAddress("getppid", "libc.so.6");
  const before = bytesAt(address, 16);
  const real = libc.getppid();
  const patch = redefine({ symbol: "getppid", library: "libc.so.6", parameters: [], result: "i32" }, returns(42));
  try {
    assert.equal(patch.calls, 0);
    assert.equal(libc.getppid(), 42);
    const id = new BigUint64Array(1);
    assert.equal(libc.pthread_create(new Uint8Array(id.buffer), 0n, address, new Uint8Array(8)), 0);
    const exit = mapPages(1);
    assert.equal(libc.pthread_join(id[0], exit), 0);
    assert.equal(new DataView(bytesAt(exit, 8).buffer).getInt32(0, true), 42, "the thread's exit value: getppid's result");
    libc.munmap(exit, 4096n);
    assert.equal(patch.calls, 2);
    assert.equal(patch.original(), real, "the original through the trampoline");
  } finally {
    patch.restore();
  }
  assert.equal(patch.calls, 2, "the count it stopped at");
  assert.deepEqual(bytesAt(address, 16), before, "the entry's bytes exactly back");
  assert.equal(libc.getppid(), real);
});

test("redefine with sequence(): each call the next value, the last repeating; typed errors for values that do not fit", () => {
  {
    using patch = redefine({ symbol: "getppid", parameters: [], result: "i32" }, sequence(7, 8, -9));
    assert.deepEqual([libc.getppid(), libc.getppid(), libc.getppid(), libc.getppid()], [7, 8, -9, -9]);
    assert.equal(patch.calls, 4);
  }
  assertCode(
    () => redefine({ symbol: "getppid", parameters: [], result: "i32" }, returns(2n ** 40n as never)),
    "BAD_REPLACEMENT",
    /returns\(\): 1099511627776n is not an integer from -2\^31 to 2\^31 - 1/,
  );
  assert.notEqual(libc.getppid(), -9, "nothing written on error");
});

test("canned replacements stack with other patches, in order", () => {
  const real = libc.getppid();
  const below = redefine({ symbol: "getppid", parameters: [], result: "i32" }, returns(1));
  const above = redefine({ symbol: "getppid", parameters: [], result: "i32" }, (): number => 2);
  assert.equal(libc.getppid(), 2);
  assert.equal(above.original(), 1, "the original of the patch above is the canned code below");
  above.restore();
  assert.equal(libc.getppid(), 1);
  assert.equal(below.calls, 2);
  below.restore();
  assert.equal(libc.getppid(), real);
});

test("returns() with callers: the library's calls through its import slot get the value, the program's do not", () => {
  const importer = loadImportLibrary(runtime, os, "canned_");
  const patch = redefine({ symbol: "labs", parameters: ["i64"], result: "i64", callers: importer.path }, returns(5n));
  try {
    assert.equal(importer.labs(-3n), 5n);
    assert.equal(libc.labs(-3n), 3n, "the program's own labs is untouched");
    assert.equal(patch.calls, 1);
  } finally {
    patch.restore();
  }
  assert.equal(importer.labs(-3n), 3n);
});
