/**
 * Issue 12 §5, bad input that crashed or was accepted: each must end in a typed `RedefineError`
 * with nothing written (code bytes and page protections as before). Cases that crashed the process
 * run in a child (test/fixtures/bad_extents.ts).
 */
import { assert, assertCode, test } from "./harness.ts";
import { redefine, restoreAll } from "../mod.ts";
import type { RedefineErrorCode } from "../mod.ts";
import { runCase, snapshot } from "./cases.ts";
import { assemble, isArm64, os, unassemble, words } from "./native.ts";
import { PROT_EXEC } from "../platform/mod.ts";

const fixture = new URL("./fixtures/bad_extents.ts", import.meta.url);

/** Asserts `body` fails with `code` and leaves `addresses` exactly as they were. */
function refused(addresses: readonly bigint[], code: RedefineErrorCode, body: () => unknown, message?: RegExp): void {
  const before = snapshot(addresses);
  try {
    assertCode(body, code, message);
  } finally {
    // A case that was accepted must not leave its patch behind for the next one.
    restoreAll();
  }
  assert.equal(snapshot(addresses), before, "code bytes and protections unchanged");
}

// long twice(long x): x + x, padded to 16 bytes.
const DOUBLE = isArm64
  ? words(0x8b000000, 0xd65f03c0, 0xd4200000, 0xd4200000) // add x0, x0, x0; ret; brk #0 ×2
  : [0x48, 0x8d, 0x04, 0x3f, 0xc3, ...Array(11).fill(0xcc)]; // lea rax, [rdi+rdi]; ret; int3 padding

const getppidTarget = { symbol: "getppid", parameters: [], result: "i32" } as const;

test("size running past the end of the mapping into an inaccessible page: INVALID_ADDRESS, no crash", () => {
  assert.deepEqual(runCase(fixture, "size past the end of the mapping"), { code: "INVALID_ADDRESS", unchanged: true });
});

test("an execute-only page (--x): INVALID_ADDRESS before reading it, no crash", () => {
  const result = runCase(fixture, "execute-only page") as Record<string, unknown>;
  if ("skipped" in result) {
    console.log(`skipped: ${result.skipped}`);
    return;
  }
  assert.deepEqual(result, { code: "INVALID_ADDRESS", protectionKept: true, unchanged: true, executeOnly: true });
});

test("size: 1e9 (far past the function's mapping): INVALID_ADDRESS, nothing written", () => {
  const getppid = os.symbolAddress("getppid");
  refused([getppid], "INVALID_ADDRESS", () => redefine({ ...getppidTarget, size: 1e9 }, () => 1), /size/);
  const { address, base } = assemble(DOUBLE);
  try {
    refused([address], "INVALID_ADDRESS", () => redefine({ address, size: 1e9, parameters: ["i64"], result: "i64" }, (x) => x));
  } finally {
    unassemble(base);
  }
});

test("NUL inside a symbol or library name: SYMBOL_NOT_FOUND / LIBRARY_NOT_FOUND, not a truncated name", () => {
  const getppid = os.symbolAddress("getppid");
  const getpid = os.symbolAddress("getpid");
  refused([getppid, getpid], "SYMBOL_NOT_FOUND", () => redefine({ ...getppidTarget, symbol: "getppid\0junk" }, { symbol: "getpid" }), /NUL/);
  refused([getppid], "LIBRARY_NOT_FOUND", () => redefine({ ...getppidTarget, library: "libc.so.6\0junk" }, { symbol: "getpid" }), /NUL/);
  refused([getppid], "SYMBOL_NOT_FOUND", () => redefine(getppidTarget, { symbol: "getpid\0junk" }), /NUL/);
  refused([getppid], "LIBRARY_NOT_FOUND", () => redefine(getppidTarget, { symbol: "getpid", library: "libc.so.6\0" }), /NUL/);
});

test("an address inside redefine's own original-stub library: INVALID_ADDRESS", () => {
  const patch = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => x);
  try {
    patch.original(-1n); // loads the stub library
    // Other code (other test files, in one process under bun test) loads images of the same name:
    // ours is the one exporting the original stubs.
    const stubs = os.mappings().find((m) => {
      if (!m.path.includes("redefine-stubs") || (m.protection & PROT_EXEC) === 0) return false;
      for (let at = m.start; at < m.end && at < m.start + 4096n; at += 4n) {
        const symbol = os.symbolAt(at);
        if (symbol) return symbol.name.startsWith("redefine_original_");
      }
      return false;
    });
    assert.ok(stubs, "the stub library's code is mapped");
    refused([stubs.start], "INVALID_ADDRESS", () => redefine({ address: stubs.start, size: 16, parameters: [], result: "void" }, () => {}), /own/);
  } finally {
    restoreAll();
  }
});

test("a data symbol as native replacement: BAD_REPLACEMENT (replacements must be code)", () => {
  const getppid = os.symbolAddress("getppid");
  refused([getppid], "BAD_REPLACEMENT", () => redefine(getppidTarget, { symbol: "environ" }), /environ/);
  refused([getppid], "INVALID_ADDRESS", () => redefine(getppidTarget, os.symbolAddress("environ")), /non-executable/);
});

test("the target itself, or an address inside the bytes overwritten, as replacement: BAD_REPLACEMENT", () => {
  const { address, base } = assemble(DOUBLE);
  const target = { address, size: DOUBLE.length, parameters: ["i64"], result: "i64" } as const;
  try {
    for (const offset of isArm64 ? [0n] : [0n, 1n, 2n, 3n, 4n]) {
      refused([address], "BAD_REPLACEMENT", () => redefine(target, address + offset), /itself|spin|loop/);
    }
    const getppid = os.symbolAddress("getppid");
    refused([getppid], "BAD_REPLACEMENT", () => redefine(getppidTarget, { symbol: "getppid" }));
    // Stacked: the same holds with a patch already there.
    const first = redefine(target, os.symbolAddress("labs"));
    try {
      const now = snapshot([address]);
      assertCode(() => redefine(target, address), "BAD_REPLACEMENT");
      assert.equal(snapshot([address]), now);
    } finally {
      first.restore();
    }
  } finally {
    restoreAll();
    unassemble(base);
  }
});

test("an address of 2^64 or more, or negative: INVALID_ADDRESS on both runtimes", () => {
  const getppid = os.symbolAddress("getppid");
  const labs = os.symbolAddress("labs");
  for (const bad of [2n ** 64n, 2n ** 64n + labs, 2n ** 80n, -1n, -labs]) {
    refused([getppid], "INVALID_ADDRESS", () => redefine({ address: bad, size: 16, parameters: [], result: "i32" }, () => 1));
    refused([getppid], "INVALID_ADDRESS", () => redefine(getppidTarget, bad));
  }
});

test("a stack of two JS replacements of getpid while the VM collects garbage: no abort, right results", () => {
  assert.deepEqual(runCase(fixture, "stacked JS replacements of getpid under allocation", 120_000), { wrong: 0, unchanged: true });
});
