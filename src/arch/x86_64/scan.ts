/**
 * The scans for relative branches into a range of bytes, the question asked before an entry is
 * overwritten: a decoding-free look for byte patterns that could be one (the answer is almost
 * always "none"), and the linear sweep that finds the real ones.
 */
import { instructionLength, operands } from "./decoder.ts";

/** What a byte may start: 0 nothing, else a rel8 branch (jmp/jcc/loop/jrcxz). */
const OPENS_REL8 = new Uint8Array(256).fill(1, 0x70, 0x80).fill(1, 0xe0, 0xe4);
OPENS_REL8[0xeb] = 1;
/** A rel8 branch lands at most this far before its first byte, and this far after. */
const REL8_BACK = 126, REL8_AHEAD = 129;

/**
 * True when some byte of `code` could start a relative branch (jmp/jcc/call/loop/jrcxz, rel8 or
 * rel32) landing strictly between `from` and `to`: a superset of the real ones, found without
 * decoding. Only the bytes within a rel8's reach of the range are looked at one by one; the rel32
 * forms are found with `indexOf` (a native scan): a first patch looks through the 2 KiB before its
 * entry, which cold JS would otherwise step through a byte at a time (~1 ms under Deno).
 */
export function mayBranchInto(code: Uint8Array, address: bigint, from: bigint, to: bigint): boolean {
  // Offsets relative to code[0]; the range is a few bytes, so plain numbers are exact here.
  const lo = Number(from - address), hi = Number(to - address);
  const n = code.length;
  for (let i = Math.max(0, lo - REL8_AHEAD + 1), last = Math.min(n - 2, hi + REL8_BACK - 1); i <= last; i++) {
    if (OPENS_REL8[code[i]!] === 0) continue;
    const target = i + 2 + ((code[i + 1]! << 24) >> 24);
    if (target > lo && target < hi) return true;
  }
  // jmp rel32 and call rel32: the opcode, then the displacement.
  for (let i = code.indexOf(0xe9); i >= 0 && i + 4 < n; i = code.indexOf(0xe9, i + 1)) {
    if (rel32Lands(code, i + 1, i + 5, lo, hi)) return true;
  }
  for (let i = code.indexOf(0xe8); i >= 0 && i + 4 < n; i = code.indexOf(0xe8, i + 1)) {
    if (rel32Lands(code, i + 1, i + 5, lo, hi)) return true;
  }
  // jcc rel32: 0F 80-8F, then the displacement.
  for (let i = code.indexOf(0x0f); i >= 0 && i + 5 < n; i = code.indexOf(0x0f, i + 1)) {
    if (code[i + 1]! >= 0x80 && code[i + 1]! <= 0x8f && rel32Lands(code, i + 2, i + 6, lo, hi)) return true;
  }
  return false;
}

/** Whether the rel32 at `at`, counted from `next`, lands strictly between `lo` and `hi`. */
function rel32Lands(code: Uint8Array, at: number, next: number, lo: number, hi: number): boolean {
  const target = next + (code[at]! | (code[at + 1]! << 8) | (code[at + 2]! << 16) | (code[at + 3]! << 24));
  return target > lo && target < hi;
}

/**
 * Addresses of the relative branches of `code` (at `address`) that land strictly between `from`
 * and `to`, decoding from its first byte. Bytes that do not decode end the sweep when
 * `stopAtUndecodable` (data or padding may follow the code), else it steps over them one byte.
 * Targets are offsets from `code` in plain numbers: a rel32 reaches ±2 GiB, and user-space code
 * sits far from both ends of the address space, so no target wraps around it.
 */
export function branchesBetween(
  code: Uint8Array,
  address: bigint,
  from: bigint,
  to: bigint,
  stopAtUndecodable: boolean,
): bigint[] {
  const lo = Number(from - address), hi = Number(to - address);
  const found = operands();
  const hits: bigint[] = [];
  for (let offset = 0; offset < code.length;) {
    const length = instructionLength(code, offset, found);
    if (length < 0) {
      if (stopAtUndecodable) break;
      offset++;
      continue;
    }
    const target = offset + length + found.rel;
    if (found.relSize !== 0 && target > lo && target < hi) hits.push(address + BigInt(offset));
    offset += length;
  }
  return hits;
}
