import { assert, assertCode, test } from "./harness.ts";
import { redefine, restoreAll } from "../mod.ts";
import {
  assemble,
  bytesAt,
  callOnAnotherThread,
  cstr,
  isArm64,
  libc,
  mapCodeFile,
  mapPages,
  os,
  protectionAt,
  runtime,
  unassemble,
  unwritableCode,
  words,
  writableExecutable,
} from "./native.ts";
import { PROT_EXEC, PROT_READ } from "../platform/mod.ts";

const realPid = libc.getpid() as number;
const realParent = libc.getppid() as number;

/** Runs `body` and asserts that the bytes and page protection at `address` come back exactly. */
function leavesNoTrace(address: bigint, body: () => void): void {
  const bytes = bytesAt(address, 32);
  const protection = protectionAt(address);
  const wx = writableExecutable();
  body();
  assert.deepEqual(bytesAt(address, 32), bytes, "code bytes restored exactly");
  assert.equal(protectionAt(address), protection, "page protection restored exactly");
  assert.deepEqual(writableExecutable(), wx, "no new writable+executable mapping");
}

test("a JS replacement of getppid is what every native caller gets, until restore", () => {
  const address = os.symbolAddress("getppid", "libc.so.6");
  leavesNoTrace(address, () => {
    const patch = redefine({ symbol: "getppid", library: "libc.so.6", parameters: [], result: "i32" }, () => 4242);
    assert.equal(patch.address, address);
    assert.equal(patch.active, true);
    assert.equal(libc.getppid(), 4242);
    assert.equal(protectionAt(address), PROT_READ | PROT_EXEC, "text page is read+execute while patched");
    patch.restore();
    assert.equal(patch.active, false);
    assert.equal(libc.getppid(), realParent);
    patch.restore(); // harmless the second time
  });
});

// V8 itself calls getpid on the JS thread, sometimes where JS may not run (during GC): a JS
// replacement of getpid can abort Deno (see the README's caveats). A native one is fine.
test("getpid redirected natively: every caller, on every thread, gets the parent's pid", () => {
  const address = os.symbolAddress("getpid", "libc.so.6");
  leavesNoTrace(address, () => {
    const patch = redefine({ symbol: "getpid", library: "libc.so.6", parameters: [], result: "i32" }, { symbol: "getppid" });
    try {
      assert.equal(libc.getpid(), realParent);
      assert.equal(Number(callOnAnotherThread(address) & 0xffffffffn), realParent, "another thread too");
    } finally {
      patch.restore();
    }
    assert.equal(libc.getpid(), realPid);
  });
});

test("64-bit integers reach a replacement as bigint: labs", () => {
  const seen: bigint[] = [];
  const address = os.symbolAddress("labs");
  leavesNoTrace(address, () => {
    const patch = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => {
      seen.push(x);
      return x * 10n;
    });
    try {
      assert.equal(libc.labs(-7n), -70n);
      // imaxabs shares labs's body in glibc: one patch redefines both.
      assert.equal(libc.imaxabs(3n), 30n);
    } finally {
      patch.restore();
    }
    assert.deepEqual(seen, [-7n, 3n]);
    assert.equal(libc.labs(-7n), 7n);
  });
});

test("pointers reach a replacement as bigint addresses; the real caller atoi sees redefined strtol", () => {
  const address = os.symbolAddress("strtol");
  leavesNoTrace(address, () => {
    const patch = redefine(
      { symbol: "strtol", parameters: ["pointer", "pointer", "i32"], result: "i64" },
      (text, end, base) => {
        assert.equal(typeof text, "bigint");
        assert.equal(end, 0n, "atoi passes NULL as endptr");
        assert.equal(base, 10);
        return BigInt(runtime.cString(text).length) * 100n;
      },
    );
    try {
      assert.equal(libc.atoi(cstr("12345")), 500, "atoi calls strtol inside libc");
    } finally {
      patch.restore();
    }
    assert.equal(libc.atoi(cstr("12345")), 12345);
  });
});

test("native to native: getppid redirected to getpid, by symbol and by address", () => {
  const address = os.symbolAddress("getppid");
  leavesNoTrace(address, () => {
    const bySymbol = redefine({ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" });
    assert.equal(libc.getppid(), realPid);
    bySymbol.restore();
    assert.equal(libc.getppid(), realParent);
    const byAddress = redefine({ address, parameters: [], result: "i32" }, os.symbolAddress("getpid"));
    assert.equal(libc.getppid(), realPid);
    byAddress.restore();
  });
});

test("using restores at the end of the scope", () => {
  {
    using patch = redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => 7);
    assert.equal(patch.active, true);
    assert.equal(libc.getppid(), 7);
  }
  assert.equal(libc.getppid(), realParent);
});

test("restoreAll restores every live patch, newest first", () => {
  const a = redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => 1);
  const b = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, () => 2n);
  assert.equal(libc.getppid(), 1);
  assert.equal(libc.labs(-5n), 2n);
  restoreAll();
  assert.equal(a.active, false);
  assert.equal(b.active, false);
  assert.equal(libc.getppid(), realParent);
  assert.equal(libc.labs(-5n), 5n);
});

// Doubles its argument.
const DOUBLE = isArm64
  ? words(
    0x8b000000, // add x0, x0, x0
    0xd65f03c0, // ret
  )
  : [0x48, 0x89, 0xf8, 0x48, 0x01, 0xc0, 0xc3]; // mov rax, rdi; add rax, rax; ret
/** `count` bytes of `nop`. */
const nops = (count: number) => (isArm64 ? words(...new Array(count / 4).fill(0xd503201f)) : new Array(count).fill(0x90));
/** The shortest entry jump: `jmp rel32`, `b`. */
const JUMP = isArm64 ? 4 : 5;

test("a raw address with its size; the jump may straddle two pages with their own protections", () => {
  // Two bytes before the page boundary: the 5-byte jump touches both pages. An arm64 function
  // starts on a word, so its 4-byte jump fills the first page's last word and the body goes on in
  // the next page.
  const { address, base } = assemble([...DOUBLE, ...nops(isArm64 ? 4 : 3)], isArm64 ? -4 : -2);
  try {
    const double = runtime.fnPointer(address, { parameters: ["i64"], result: "i64" });
    assert.equal(double(21n), 42n);
    leavesNoTrace(address, () => {
      const patch = redefine({ address, size: isArm64 ? 12 : 10, parameters: ["i64"], result: "i64" }, (x) => x + 1n);
      assert.equal(protectionAt(address), PROT_READ | PROT_EXEC);
      assert.equal(protectionAt(address + 4n), PROT_READ | PROT_EXEC);
      assert.equal(double(21n), 22n);
      patch.restore();
    });
    assert.equal(double(21n), 42n);
  } finally {
    unassemble(base);
  }
});

test("a function with no symbol and no size is refused: UNKNOWN_SIZE, nothing written", () => {
  const { address, base } = assemble(DOUBLE, 0);
  try {
    leavesNoTrace(address, () => {
      assertCode(() => redefine({ address, parameters: ["i64"], result: "i64" }, (x) => x), "UNKNOWN_SIZE", /\{ size \}/);
    });
  } finally {
    unassemble(base);
  }
});

test("errors: unknown symbol, missing library, bad signature, bad replacement", () => {
  assertCode(() => redefine({ symbol: "no_such_function_xyz", parameters: [], result: "void" }, () => {}), "SYMBOL_NOT_FOUND", /no_such_function_xyz/);
  assertCode(() => redefine({ symbol: "getpid", library: "libnope.so.9", parameters: [], result: "i32" }, () => 1), "LIBRARY_NOT_FOUND", /libnope/);
  assertCode(() => redefine({ symbol: "getpid", parameters: ["int" as "i32"], result: "i32" }, () => 1), "BAD_SIGNATURE", /'int'/);
  assertCode(() => redefine({ symbol: "getpid", parameters: [], result: "long" as "i32" }, () => 1), "BAD_SIGNATURE");
  assertCode(() => redefine({ symbol: "getpid", parameters: [], result: "i32" }, null as never), "BAD_REPLACEMENT");
  assertCode(() => redefine({ symbol: "getpid", parameters: [], result: "i32" }, "getpid" as never), "BAD_REPLACEMENT");
  assertCode(() => redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, ((a: bigint, b: bigint) => a + b) as never), "BAD_REPLACEMENT", /2 parameters/);
  assert.equal(libc.getpid(), realPid);
});

test("errors: NULL, non-code and too-short targets; nothing written", () => {
  assertCode(() => redefine({ address: 0n, size: 16, parameters: [], result: "void" }, () => {}), "INVALID_ADDRESS", /NULL/);
  const data = mapPages(1);
  assertCode(() => redefine({ address: data, size: 16, parameters: [], result: "void" }, () => {}), "INVALID_ADDRESS", /non-executable/);
  libc.munmap(data, BigInt(os.pageSize));
  const { address, base } = assemble(DOUBLE, 0);
  try {
    leavesNoTrace(address, () => {
      assertCode(() => redefine({ address, size: JUMP - 1, parameters: ["i64"], result: "i64" }, (x) => x), "FUNCTION_TOO_SHORT", new RegExp(`${JUMP - 1} bytes`));
    });
  } finally {
    unassemble(base);
  }
  // Unmapped: just past a fresh mapping that was unmapped again.
  assertCode(() => redefine({ address: base, size: 16, parameters: [], result: "void" }, () => {}), "INVALID_ADDRESS", /not mapped/);
});

// arm64's entry jumps are one word each: two can coincide (layers), never overlap.
if (!isArm64) test("errors: ALREADY_PATCHED for overlapping entries, then PATCH_MODIFIED when something else rewrote the entry", () => {
  const { address: f, base } = assemble([...DOUBLE, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90, 0x90], 0);
  try {
    const p = redefine({ address: f, size: 16, parameters: ["i64"], result: "i64" }, (x) => x);
    // Whatever the jump's displacement bytes decode to, the overlap is what refuses it.
    for (const offset of [1n, 2n, 3n, 4n]) {
      assertCode(() => redefine({ address: f + offset, size: 16 - Number(offset), parameters: [], result: "void" }, () => {}), "ALREADY_PATCHED", /overlap/);
    }
    p.restore();
  } finally {
    restoreAll();
    unassemble(base);
  }
});

// The registry finds neighbours by the 64-byte block their jump starts in: an entry jump that runs
// over a block's end, and one that starts where another's reach ends, are found across it.
if (!isArm64) test("errors: ALREADY_PATCHED for entry jumps overlapping across a 64-byte block boundary; the byte after one is free", () => {
  const { address: code, base } = assemble([...Array(192).fill(0x90), 0xc3], 0);
  const labs = os.symbolAddress("labs");
  const at = (offset: number) => ({ address: code + BigInt(offset), size: 8, parameters: ["i64"], result: "i64" }) as const;
  try {
    redefine(at(60), labs); // its 5-byte jump covers 60..64, into the next block
    assertCode(() => redefine(at(64), labs), "ALREADY_PATCHED", /overlap/);
    redefine(at(65), labs).restore();
    redefine(at(128), labs); // a block's first byte
    assertCode(() => redefine(at(124), labs), "ALREADY_PATCHED", /overlap/);
    redefine(at(123), labs).restore();
  } finally {
    restoreAll();
    unassemble(base);
  }
});

// What was learnt of an entry (no code jumps into it) describes the code that was there: other
// code mapped in its place once it is unmapped must be scanned again, as fresh memory is.
const entryAt = (code: bigint) => ({ address: code + 64n, size: 8, parameters: ["i64"], result: "i64" }) as const;
/** Code at offset 0 that jumps (jmp rel8) to offset 66, the third byte of an entry at 64. */
const JUMPING_IN = [0xeb, 0x40, ...Array(62).fill(0x90), ...Array(8).fill(0x90), 0xc3];
const NO_JUMP = [...Array(72).fill(0x90), 0xc3];

// Anonymous memory unmapped and mapped again at the same place with another extent: the bytes the
// first scan read (its mapping began 64 bytes before the entry) are the same again, but the new
// mapping begins a page earlier, and code there jumps in. (With the same extent and protection,
// nothing tells: README, "Not guaranteed".)
if (!isArm64) test("errors: UNRELOCATABLE for code jumping into an entry from before where its old mapping began", () => {
  const labs = os.symbolAddress("labs");
  const page = BigInt(os.pageSize);
  const first = assemble(NO_JUMP, 0);
  redefine(entryAt(first.address), labs).restore();
  unassemble(first.base);
  // The same four pages: code from the first (the old guard page) to the third, then a guard.
  const code = mapPages(4, first.base - page);
  // At base - 16: jmp rel32 to base + 66 (the entry's third byte); nops from there to the entry.
  const bytes = [...Array(Number(page) - 16).fill(0x90), 0xe9, 77, 0, 0, 0, ...Array(11).fill(0x90), ...NO_JUMP];
  runtime.view(code, bytes.length).set(bytes);
  try {
    assert.equal(libc.mprotect(code + 3n * page, page, 0), 0);
    assert.equal(libc.mprotect(code, 3n * page, PROT_READ | PROT_EXEC), 0);
    assert.ok(os.mappingAt(first.address)!.start <= code);
    assertCode(() => redefine(entryAt(first.base), labs), "UNRELOCATABLE", /jumps into the first/);
  } finally {
    restoreAll();
    libc.munmap(code, 4n * page);
  }
});

// A file mapped over another's pages (MAP_FIXED: no unmap between), as a library loaded where an
// unloaded one was: another device and inode at the same place.
if (!isArm64) test("errors: UNRELOCATABLE for new code jumping into an entry, a file mapped over the patched file's pages", () => {
  const labs = os.symbolAddress("labs");
  const page = BigInt(os.pageSize);
  const start = mapPages(4);
  const base = start + page;
  try {
    assert.equal(libc.mprotect(start, page, 0), 0);
    assert.equal(libc.mprotect(base + 2n * page, page, 0), 0);
    mapCodeFile(NO_JUMP, base);
    redefine(entryAt(base), labs).restore();
    mapCodeFile(JUMPING_IN, base);
    assertCode(() => redefine(entryAt(base), labs), "UNRELOCATABLE", /jumps into the first/);
  } finally {
    restoreAll();
    libc.munmap(start, 4n * page);
  }
});

test("errors: PATCH_MODIFIED when something else rewrote the entry", () => {
  const { address: f, base } = assemble(DOUBLE, 0);
  try {
    const p = redefine({ address: f, size: DOUBLE.length, parameters: ["i64"], result: "i64" }, (x) => x);
    const ours = bytesAt(f, JUMP);
    libc.mprotect(base, BigInt(os.pageSize), 7);
    runtime.view(f, 1).set([0xcc]);
    assertCode(() => p.restore(), "PATCH_MODIFIED", /something else patched it/);
    assert.equal(p.active, true);
    runtime.view(f, JUMP).set(ours);
    libc.mprotect(base, BigInt(os.pageSize), PROT_READ | PROT_EXEC);
    p.restore();
    assert.deepEqual(bytesAt(f, DOUBLE.length), Uint8Array.from(DOUBLE));
  } finally {
    unassemble(base);
  }
});

// x86-64 glibc resolves time to the vDSO; arm64 glibc has a time of its own, and qemu-user no vDSO.
if (!isArm64) {
  test("time lives in the vDSO, which mprotect will not make writable: without /proc/self/mem, PROTECT_FAILED with errno", () => {
    const address = os.symbolAddress("time");
    const vdso = os.mappings().find((m) => m.path === "[vdso]")!;
    assert.ok(address >= vdso.start && address < vdso.end, "glibc's time resolves into the vDSO");
    const forceWrite = os.forceWrite;
    os.forceWrite = () => false; // as on a kernel that refuses forced writes (test/platform.test.ts has the rest)
    try {
      leavesNoTrace(address, () => {
        assertCode(() => redefine({ symbol: "time", parameters: ["pointer"], result: "i64" }, () => 0n), "PROTECT_FAILED", /EINVAL/);
      });
    } finally {
      os.forceWrite = forceWrite;
    }
  });
}

test("code in a read-only shared file mapping, which mprotect refuses: PROTECT_FAILED with errno", () => {
  const address = unwritableCode();
  try {
    leavesNoTrace(address, () => {
      assertCode(() => redefine({ address, size: 64, parameters: [], result: "void" }, os.symbolAddress("getpid")), "PROTECT_FAILED", /EACCES/);
    });
  } finally {
    libc.munmap(address, BigInt(os.pageSize));
  }
});
