/**
 * The scans for relative branches into a range of bytes, the question asked before an entry is
 * overwritten: a decoding-free look for byte patterns that could be one (the answer is almost
 * always "none"), and the linear sweep that finds the real ones.
 */
import { instructionLength, operands } from "./decoder.ts";

/** What a byte may start: 0 nothing, else a rel8 branch, a rel32 jmp/call, or the 0F of jcc rel32. */
const OPENS = new Uint8Array(256);
const REL8 = 1, REL32 = 2, ESCAPE = 3;
OPENS.fill(REL8, 0x70, 0x80).fill(REL8, 0xe0, 0xe4);
OPENS[0xeb] = REL8;
OPENS[0xe8] = OPENS[0xe9] = REL32;
OPENS[0x0f] = ESCAPE;

/**
 * True when some byte of `code` could start a relative branch (jmp/jcc/call/loop/jrcxz, rel8 or
 * rel32) landing strictly between `from` and `to`: a superset of the real ones, found without
 * decoding.
 */
export function mayBranchInto(code: Uint8Array, address: bigint, from: bigint, to: bigint): boolean {
  // Offsets relative to code[0]; the range is a few bytes, so plain numbers are exact here.
  const lo = Number(from - address), hi = Number(to - address);
  const n = code.length;
  for (let i = 0; i < n; i++) {
    const opens = OPENS[code[i]];
    if (opens === 0) continue;
    let target: number;
    if (opens === REL8) {
      if (i + 1 >= n) continue;
      target = i + 2 + ((code[i + 1] << 24) >> 24);
    } else if (opens === REL32) {
      if (i + 4 >= n) continue;
      target = i + 5 + (code[i + 1] | (code[i + 2] << 8) | (code[i + 3] << 16) | (code[i + 4] << 24));
    } else {
      if (i + 5 >= n || code[i + 1] < 0x80 || code[i + 1] > 0x8f) continue;
      target = i + 6 + (code[i + 2] | (code[i + 3] << 8) | (code[i + 4] << 16) | (code[i + 5] << 24));
    }
    if (target > lo && target < hi) return true;
  }
  return false;
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
