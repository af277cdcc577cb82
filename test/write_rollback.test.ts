// A write whose bytes all landed but whose pages' protection cannot be given back is undone whole:
// the old bytes go back too (pages made writable again where needed), nothing stays registered,
// and the error says what happened. The platform's protect is replaced by one that refuses the
// restoring calls (those without write), as the kernel would at its mapping limit.
import { assert, assertCode, test } from "./harness.ts";
import { redefine, transaction } from "../mod.ts";
import type { Patch } from "../mod.ts";
import { RedefineError } from "../src/errors.ts";
import { PROT_WRITE } from "../platform/mod.ts";
import { assemble, bytesAt, isArm64, libc, os, protectionAt, runtime, unassemble, words } from "./native.ts";

// Returns its argument: a patch redirecting it to labs makes f(-4) 4.
const IDENTITY = isArm64
  ? words(0xd65f03c0, 0xd4200000, 0xd4200000, 0xd4200000) // ret (x0 is the argument); brk #0 ×3
  : [0x48, 0x89, 0xf8, 0xc3, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc]; // mov rax, rdi; ret

/** Runs `body` with two identity functions in pages of their own (one run each), unmapped after. */
function withTwoRuns(body: (functions: readonly bigint[]) => void): void {
  const pieces = [assemble(IDENTITY), assemble(IDENTITY)];
  try {
    body(pieces.map((p) => p.address));
  } finally {
    for (const { base } of pieces) unassemble(base);
  }
}

/**
 * Runs `body` with forced writes off (the protecting path: every run is made writable, then given
 * its protection back) and `refuse(n)` asked for the n-th restoring protect call (from 1): true
 * makes it fail, as mprotect would, with nothing changed. Returns what `body` returned.
 */
function withRefusals<T>(refuse: (n: number) => boolean, body: () => T): T {
  const protect = os.protect;
  const forceWrite = os.forceWrite;
  let restoring = 0;
  os.protect = (start, length, protection) => {
    if (!(protection & PROT_WRITE) && refuse(++restoring)) {
      throw new RedefineError("PROTECT_FAILED", `mprotect(0x${start.toString(16)}, ${length}) failed: ENOMEM (test).`);
    }
    protect.call(os, start, length, protection);
  };
  os.forceWrite = () => false;
  try {
    return body();
  } finally {
    os.protect = protect;
    os.forceWrite = forceWrite;
  }
}

/** The bytes and protection of each function, for before/after comparisons. */
function state(functions: readonly bigint[]): string {
  return JSON.stringify(functions.map((f) => [[...bytesAt(f, 16)].join(), protectionAt(f)]));
}

const identityTarget = (address: bigint) => ({ address, size: 16, parameters: ["i64"], result: "i64" }) as const;
const call = (address: bigint) => runtime.fnPointer(address, { parameters: ["i64"], result: "i64" })(-4n);

test("a batch whose protection cannot be given back: every byte goes back, nothing is registered", () => {
  withTwoRuns((functions) => {
    const before = state(functions);
    const patches: Patch<readonly ["i64"], "i64">[] = [];
    // The second run's restoring call fails, once: the first run's protection is already back, so
    // the undo makes it writable again to put its bytes back.
    withRefusals((n) => n === 2, () =>
      assertCode(
        () => transaction(() => functions.forEach((f) => patches.push(redefine(identityTarget(f), os.symbolAddress("labs"))))),
        "PROTECT_FAILED",
        /ENOMEM \(test\)/,
      ));
    assert.equal(state(functions), before, "bytes and protections of both runs as before");
    assert.deepEqual(patches.map((p) => p.active), [false, false], "no patch stays live");
    assert.deepEqual(functions.map(call), [-4n, -4n], "both functions are themselves");
    // The registry is consistent: the same patches can be made and restored.
    const again = functions.map((f) => redefine(identityTarget(f), os.symbolAddress("labs")));
    assert.deepEqual(functions.map(call), [4n, 4n]);
    again.forEach((p) => p.restore());
    assert.equal(state(functions), before);
  });
});

test("a lone patch whose page cannot be given its protection back: the bytes go back, the patch is not made", () => {
  withTwoRuns((functions) => {
    const before = state(functions);
    withRefusals((n) => n === 1, () =>
      assertCode(() => redefine(identityTarget(functions[0]), os.symbolAddress("labs")), "PROTECT_FAILED", /ENOMEM \(test\)/));
    assert.equal(state(functions), before);
    assert.equal(call(functions[0]), -4n);
    redefine(identityTarget(functions[0]), os.symbolAddress("labs")).restore();
    assert.equal(state(functions), before);
  });
});

test("protection that can never be given back: the bytes go back, and the error names the page left writable", () => {
  withTwoRuns((functions) => {
    const before = bytesAt(functions[0], 16);
    const protection = protectionAt(functions[0]);
    withRefusals(() => true, () =>
      assertCode(
        () => redefine(identityTarget(functions[0]), os.symbolAddress("labs")),
        "PROTECT_FAILED",
        /ENOMEM \(test\)\. Then putting everything back failed too: the bytes are back, but 0x[0-9a-f]+ \(\d+ bytes\) stays writable/,
      ));
    assert.deepEqual(bytesAt(functions[0], 16), before, "the old bytes are back");
    assert.equal(protectionAt(functions[0]), protection | PROT_WRITE, "the page is left writable, as the error says");
    assert.equal(call(functions[0]), -4n);
    assert.equal(libc.mprotect(functions[0] - functions[0] % BigInt(os.pageSize), BigInt(os.pageSize), protection), 0);
  });
});
