/**
 * The scans for relative branches into a range of bytes, the question asked before an entry is
 * overwritten: a decoding-free look for byte patterns that could be one (the answer is almost
 * always "none"), and the linear sweep that finds the real ones.
 */
import { instructionLength, operands } from "./decoder.ts";

/**
 * True when some byte of `code` could start a relative branch (jmp/jcc/call/loop/jrcxz, rel8 or
 * rel32) landing strictly between `from` and `to`: a superset of the real ones, found without
 * decoding.
 */
export function mayBranchInto(code: Uint8Array, address: bigint, from: bigint, to: bigint): boolean {
  // Offsets relative to code[0]; the range is a few bytes, so plain numbers are exact here.
  const lo = Number(from - address), hi = Number(to - address);
  const lands = (end: number, disp: number) => end + disp > lo && end + disp < hi;
  const view = new DataView(code.buffer, code.byteOffset, code.byteLength);
  for (let i = 0; i < code.length; i++) {
    const b = code[i];
    const rel8 = (b >= 0x70 && b <= 0x7f) || b === 0xeb || (b >= 0xe0 && b <= 0xe3);
    if (rel8 && i + 1 < code.length && lands(i + 2, view.getInt8(i + 1))) return true;
    if ((b === 0xe8 || b === 0xe9) && i + 4 < code.length && lands(i + 5, view.getInt32(i + 1, true))) return true;
    if (b === 0x0f && i + 5 < code.length && code[i + 1] >= 0x80 && code[i + 1] <= 0x8f &&
      lands(i + 6, view.getInt32(i + 2, true))) return true;
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
