import { assert, assertCode, runtimeName, test } from "./harness.ts";
import { redefine } from "../mod.ts";
import { assemble, bytesAt, callOnAnotherThread, cstr, isArm64, libc, os, runtime, unassemble, words } from "./native.ts";

const realParent = libc.getppid() as number;

test("wrap labs: the replacement calls the original through the trampoline", () => {
  const before = bytesAt(os.symbolAddress("labs"), 16);
  const patch = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x): bigint => patch.original(x) * 10n);
  try {
    assert.equal(libc.labs(-7n), 70n);
    assert.equal(patch.original(-7n), 7n, "original() from JS is the real labs");
    assert.notEqual(patch.originalAddress, patch.address, "the original runs from a trampoline");
  } finally {
    patch.restore();
  }
  assert.equal(patch.original(-3n), 3n, "original() still works after restore: the function itself");
  assert.equal(patch.originalAddress, patch.address);
  assert.deepEqual(bytesAt(os.symbolAddress("labs"), 16), before);
});

// Deno on arm64 (under qemu) aborts here: V8 calls strlen on the JS thread where JS may not run
// ("Invoke in DisallowJavascriptExecutionScope"), which no guard can tell from an FFI call. The
// README says so; elsewhere the test runs.
if (!(isArm64 && runtimeName === "deno")) test("wrap strlen, which the runtime calls while dispatching the callback: no recursion", () => {
  let calls = 0;
  const patch = redefine({ symbol: "strlen", library: "libc.so.6", parameters: ["pointer"], result: "u64" }, (s): bigint => {
    calls++;
    return patch.original(s) + 1n;
  });
  try {
    assert.equal(libc.strlen(cstr("hello")), 6n);
    assert.equal(libc.strlen(cstr("")), 1n);
  } finally {
    patch.restore();
  }
  assert.equal(calls, 2, "each native call reaches the replacement exactly once");
  assert.equal(libc.strlen(cstr("hello")), 5n);
});

test("wrap memcmp: negate the original's answer", () => {
  const patch = redefine(
    // Named with its library: Bun's executable exports a memcmp of its own, found first by a
    // whole-process search.
    { symbol: "memcmp", library: "libc.so.6", parameters: ["pointer", "pointer", "usize"], result: "i32" },
    (a, b, n): number => -patch.original(a, b, n),
  );
  try {
    assert.ok((libc.memcmp(cstr("abc"), cstr("abd"), 3n) as number) > 0);
    assert.equal(libc.memcmp(cstr("abc"), cstr("abc"), 3n), 0);
  } finally {
    patch.restore();
  }
  assert.ok((libc.memcmp(cstr("abc"), cstr("abd"), 3n) as number) < 0);
});

test("wrap qsort: the replacement sorts with its own JS comparator through the original", () => {
  const descending = runtime.callback({ parameters: ["pointer", "pointer"], result: "i32" }, (a: bigint, b: bigint) => {
    const x = runtime.view(a, 4), y = runtime.view(b, 4);
    return new Int32Array(y.slice().buffer)[0] - new Int32Array(x.slice().buffer)[0];
  });
  const patch = redefine(
    { symbol: "qsort", library: "libc.so.6", parameters: ["pointer", "usize", "usize", "pointer"], result: "void" },
    (base, n, size, _compare): void => patch.original(base, n, size, descending.address),
  );
  const ascending = runtime.callback({ parameters: ["pointer", "pointer"], result: "i32" }, (a: bigint, b: bigint) =>
    new Int32Array(runtime.view(a, 4).slice().buffer)[0] - new Int32Array(runtime.view(b, 4).slice().buffer)[0]);
  try {
    const numbers = new Int32Array([3, 1, 4, 1, 5, 9, 2, 6]);
    libc.qsort(new Uint8Array(numbers.buffer), 8n, 4n, ascending.address);
    assert.deepEqual([...numbers], [9, 6, 5, 4, 3, 2, 1, 1]);
  } finally {
    patch.restore();
  }
  const numbers = new Int32Array([3, 1, 4]);
  libc.qsort(new Uint8Array(numbers.buffer), 3n, 4n, ascending.address);
  assert.deepEqual([...numbers], [1, 3, 4]);
  ascending.close();
  descending.close();
});

test("another thread calling a function with a JS replacement runs the original (guard stub)", () => {
  const getppid = os.symbolAddress("getppid");
  const patch = redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => 4242);
  try {
    assert.equal(libc.getppid(), 4242, "the JS thread gets the replacement");
    assert.equal(Number(callOnAnotherThread(getppid) & 0xffffffffn), realParent, "another thread gets the original");
    assert.equal(libc.getppid(), 4242);
  } finally {
    patch.restore();
  }
});

test("the guard passes stack arguments and returns untouched: ten integer parameters", () => {
  // sum10: the register arguments (six on x86-64, eight on arm64), then the stack ones.
  const { address, base } = assemble(
    isArm64
      ? words(
        0x8b010000, // add x0, x0, x1
        0x8b020000, // add x0, x0, x2
        0x8b030000, // add x0, x0, x3
        0x8b040000, // add x0, x0, x4
        0x8b050000, // add x0, x0, x5
        0x8b060000, // add x0, x0, x6
        0x8b070000, // add x0, x0, x7
        0xa9402be9, // ldp x9, x10, [sp]
        0x8b090000, // add x0, x0, x9
        0x8b0a0000, // add x0, x0, x10
        0xd65f03c0, // ret
      )
      : [
        0x48, 0x8d, 0x04, 0x37, //       lea rax, [rdi+rsi]
        0x48, 0x01, 0xd0, //             add rax, rdx
        0x48, 0x01, 0xc8, //             add rax, rcx
        0x4c, 0x01, 0xc0, //             add rax, r8
        0x4c, 0x01, 0xc8, //             add rax, r9
        0x48, 0x03, 0x44, 0x24, 0x08, // add rax, [rsp+8]
        0x48, 0x03, 0x44, 0x24, 0x10, // add rax, [rsp+16]
        0x48, 0x03, 0x44, 0x24, 0x18, // add rax, [rsp+24]
        0x48, 0x03, 0x44, 0x24, 0x20, // add rax, [rsp+32]
        0xc3, //                         ret
      ],
  );
  try {
    const signature = {
      parameters: ["i64", "i64", "i64", "i64", "i64", "i64", "i64", "i64", "i64", "i64"],
      result: "i64",
    } as const;
    const sum10 = runtime.fnPointer(address, signature);
    const args = [1n, 2n, 3n, 4n, 5n, 6n, 7n, 8n, 9n, 10n];
    const patch = redefine({ address, size: isArm64 ? 44 : 37, ...signature }, (a, b, c, d, e, f, g, h, i, j): bigint =>
      [a, b, c, d, e, f, g, h, i, j].reduce((sum, x, k) => sum + x * 10n ** BigInt(k), 0n) +
      patch.original(a, b, c, d, e, f, g, h, i, j) * 10n ** 11n);
    try {
      assert.equal(sum10(...args), 10987654321n + 55n * 10n ** 11n);
    } finally {
      patch.restore();
    }
    assert.equal(sum10(...args), 55n);
  } finally {
    unassemble(base);
  }
});

/** Assembles `code`, wraps it with a JS replacement calling the original, returns both results. */
function wrapped(code: number[], args: bigint[]): { direct: bigint[]; through: bigint[] } {
  const { address, base } = assemble(code);
  try {
    const signature = { parameters: ["i64"], result: "i64" } as const;
    const fn = runtime.fnPointer(address, signature);
    const direct = args.map((a) => fn(a) as bigint);
    const patch = redefine({ address, size: code.length, ...signature }, (x): bigint => patch.original(x) + 1000n);
    try {
      return { direct, through: args.map((a) => (fn(a) as bigint) - 1000n) };
    } finally {
      patch.restore();
    }
  } finally {
    unassemble(base);
  }
}

test("relocation end to end: a pc-relative load in the prologue", () => {
  const { direct, through } = wrapped(isArm64
    ? [
      ...words(
        0x58000081, // ldr x1, #16 (the constant below)
        0x8b010000, // add x0, x0, x1
        0xd65f03c0, // ret
        0xd503201f, // nop
      ),
      0x40, 0xe2, 0x01, 0, 0, 0, 0, 0, // .quad 123456
    ]
    : [
      0x48, 0x8b, 0x05, 0x09, 0, 0, 0, // mov rax, [rip+9]  (the constant below)
      0x48, 0x01, 0xf8, //                add rax, rdi
      0xc3, //                            ret
      0xcc, 0xcc, 0xcc, 0xcc, 0xcc, //    padding
      0x40, 0xe2, 0x01, 0, 0, 0, 0, 0, // dq 123456
    ], [1n]);
  assert.deepEqual(direct, [123457n]);
  assert.deepEqual(through, direct);
});

test("relocation end to end: a conditional branch leaving the prologue", () => {
  const { direct, through } = wrapped(isArm64
    ? words(
      0xb4000060, // cbz x0, zero
      0xd2800020, // mov x0, #1
      0xd65f03c0, // ret
      0xd2800040, // zero: mov x0, #2
      0xd65f03c0, // ret
    )
    : [
      0x48, 0x85, 0xff, //                         test rdi, rdi
      0x74, 0x08, //                               jz +8 (to zero)
      0x48, 0xc7, 0xc0, 0x01, 0, 0, 0, //          mov rax, 1
      0xc3, //                                     ret
      0x48, 0xc7, 0xc0, 0x02, 0, 0, 0, //          zero: mov rax, 2
      0xc3, //                                     ret
    ], [0n, 5n]);
  assert.deepEqual(direct, [2n, 1n]);
  assert.deepEqual(through, direct);
});

// On arm64 the patch moves one word, and a bl there would lose the return address: its relative
// there is the tail call, a b.
test("relocation end to end: a call (a tail call on arm64) in the prologue", () => {
  const { direct, through } = wrapped(isArm64
    ? words(
      0x14000002, // b helper
      0x00000000, // udf #0
      0x8b000000, // helper: add x0, x0, x0
      0x91000400, // add x0, x0, #1
      0xd65f03c0, // ret
    )
    : [
      0xe8, 0x05, 0, 0, 0, //                      call +5 (helper)
      0x48, 0x83, 0xc0, 0x01, //                   add rax, 1
      0xc3, //                                     ret
      0x48, 0x8d, 0x04, 0x3f, //                   helper: lea rax, [rdi+rdi]
      0xc3, //                                     ret
    ], [20n]);
  assert.deepEqual(direct, [41n]);
  assert.deepEqual(through, direct);
});

// arm64's entry jump is one word: no branch can land strictly inside it.
if (!isArm64) test("a branch back into the overwritten bytes: UNRELOCATABLE for a JS replacement, nothing written", () => {
  const code = [
    0x31, 0xc0, //             xor eax, eax
    0x48, 0xff, 0xc0, //       loop: inc rax
    0x48, 0x39, 0xf8, //       cmp rax, rdi
    0x75, 0xf8, //             jne loop (back to offset 2, inside the first 5 bytes)
    0xc3, //                   ret
  ];
  const { address, base } = assemble(code);
  try {
    const before = bytesAt(address, code.length);
    assertCode(
      () => redefine({ address, size: code.length, parameters: ["i64"], result: "i64" }, (x) => x),
      "UNRELOCATABLE",
      /native replacement/,
    );
    assert.deepEqual(bytesAt(address, code.length), before);
    // A native replacement needs no original: the patch is made, only originalAddress refuses.
    const patch = redefine({ address, size: code.length, parameters: ["i64"], result: "i64" }, os.symbolAddress("labs"));
    try {
      assertCode(() => patch.originalAddress, "UNRELOCATABLE");
      assert.equal(runtime.fnPointer(address, { parameters: ["i64"], result: "i64" })(-9n), 9n);
    } finally {
      patch.restore();
    }
    assert.deepEqual(bytesAt(address, code.length), before);
  } finally {
    unassemble(base);
  }
});
