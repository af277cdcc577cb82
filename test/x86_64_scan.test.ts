/**
 * The x86-64 look for byte patterns that could be a relative branch into a range
 * (src/arch/x86_64/scan.ts `mayBranchInto`), against the plain definition: every byte of the code
 * read as the start of a rel8 branch, a jmp/call rel32 or a jcc rel32, in turn.
 */
import { assert, test } from "./harness.ts";
import { mayBranchInto } from "../src/arch/x86_64/scan.ts";

/** The definition, a byte at a time: could any byte start a relative branch landing strictly inside (lo, hi)? */
function reference(code: Uint8Array, lo: number, hi: number): boolean {
  const n = code.length;
  const s32 = (at: number) => code[at]! | (code[at + 1]! << 8) | (code[at + 2]! << 16) | (code[at + 3]! << 24);
  for (let i = 0; i < n; i++) {
    const b = code[i]!;
    let target: number | null = null;
    if ((b >= 0x70 && b < 0x80) || (b >= 0xe0 && b < 0xe4) || b === 0xeb) {
      if (i + 1 < n) target = i + 2 + ((code[i + 1]! << 24) >> 24);
    } else if (b === 0xe8 || b === 0xe9) {
      if (i + 4 < n) target = i + 5 + s32(i + 1);
    } else if (b === 0x0f) {
      if (i + 5 < n && code[i + 1]! >= 0x80 && code[i + 1]! <= 0x8f) target = i + 6 + s32(i + 2);
    }
    if (target !== null && target > lo && target < hi) return true;
  }
  return false;
}

/** A small deterministic generator: the same cases on every run. */
function random(seed: number): () => number {
  let x = seed;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

const BASE = 0x7f00_0000_0000n;

test("mayBranchInto: agrees with the byte-at-a-time definition on random code around every kind of range", () => {
  const next = random(12345);
  // Bytes weighted to the branch openers, so that hits and near misses are common.
  const openers = [0x70, 0x7f, 0xe0, 0xe3, 0xeb, 0xe8, 0xe9, 0x0f, 0x80, 0x8f];
  let hits = 0;
  for (let round = 0; round < 3000; round++) {
    const n = 1 + Math.floor(next() * 400);
    const byte = () => (next() < 0.3 ? openers[Math.floor(next() * openers.length)]! : Math.floor(next() * 256));
    const code = Uint8Array.from({ length: n }, byte);
    // Ranges after the code (a scan before an entry), before it (code after moved bytes), inside it, and far.
    const kind = round % 4;
    const length = 1 + Math.floor(next() * 20);
    const lo = kind === 0
      ? n + Math.floor(next() * 3)
      : kind === 1
      ? -length - Math.floor(next() * 3)
      : kind === 2
      ? Math.floor(next() * n)
      : n + 200 + Math.floor(next() * 100);
    const hi = lo + length;
    const expected = reference(code, lo, hi);
    if (expected) hits++;
    const found = mayBranchInto(code, BASE, BASE + BigInt(lo), BASE + BigInt(hi));
    assert.equal(found, expected, `round ${round}: ${lo}..${hi} in ${n} bytes`);
  }
  assert.ok(hits > 100, `only ${hits} cases had a branch into the range`);
});

test("mayBranchInto: finds the farthest rel8, rel32 jumps and calls, and a jcc rel32 whose last byte ends the code", () => {
  const code = (length: number, at: number, bytes: number[]) => {
    const c = new Uint8Array(length).fill(0x90);
    c.set(bytes, at);
    return c;
  };
  const n = 300;
  // A rel8 at its farthest, forward from the code's start and backward from its end.
  assert.equal(mayBranchInto(code(n, 0, [0xeb, 0x7f]), BASE, BASE + 128n, BASE + 130n), true); // lands at 129
  assert.equal(mayBranchInto(code(n, 0, [0xeb, 0x7f]), BASE, BASE + 129n, BASE + 131n), false);
  assert.equal(mayBranchInto(code(n, 290, [0x74, 0x80]), BASE, BASE + 162n, BASE + 165n), true); // lands at 164
  assert.equal(mayBranchInto(code(n, 290, [0x74, 0x80]), BASE, BASE + 164n, BASE + 166n), false);
  // jmp/call rel32 to just after the code; a jcc rel32 in the code's last six bytes.
  const disp = (value: number) => [value & 0xff, (value >> 8) & 0xff, (value >> 16) & 0xff, (value >>> 24) & 0xff];
  assert.equal(mayBranchInto(code(n, 10, [0xe9, ...disp(n - 15 + 1)]), BASE, BASE + BigInt(n), BASE + BigInt(n + 4)), true);
  assert.equal(mayBranchInto(code(n, 10, [0xe8, ...disp(n - 15 + 1)]), BASE, BASE + BigInt(n), BASE + BigInt(n + 4)), true);
  assert.equal(mayBranchInto(code(n, n - 6, [0x0f, 0x85, ...disp(2)]), BASE, BASE + BigInt(n), BASE + BigInt(n + 4)), true);
  // Cut off: an opener without all of its displacement is no branch.
  const cut = code(n, n - 5, [0xe9, ...disp(0)]).subarray(0, n - 1);
  assert.equal(mayBranchInto(cut, BASE, BASE + BigInt(n - 1), BASE + BigInt(n + 4)), false);
  // A backward rel32 into a range before the code.
  assert.equal(mayBranchInto(code(n, 100, [0xe9, ...disp(-108)]), BASE, BASE - 5n, BASE), true); // lands at -3
});
