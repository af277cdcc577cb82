/**
 * AArch64 encoders. Pure: addresses in, 32-bit instruction words or little-endian bytes out.
 * Branch encoders return null when the target is out of the instruction's reach, so callers pick
 * a longer form. The absolute forms go through x16, an intra-procedure-call scratch register that
 * AAPCS64 lets any veneer clobber, so they are safe where the arguments are live.
 */
import { hex, RedefineError } from "../../errors.ts";

/** `nop`: the filler, since a zero word decodes as `udf #0` and traps. */
export const NOP = 0xd503201f;
/** Length of `b imm26`. */
export const B_SIZE = 4;
/** Length of `adrp x16, page; add x16, x16, #lo12; br x16`. */
export const JUMP_PAGE_SIZE = 12;
/**
 * Largest distance, either way, `jumpPage` reaches from its own address: `adrp` reaches 2^20 pages
 * forward of the page it is on, the last of them ending 2^32 - 4096 bytes past its own page's
 * start, and 2^20 pages back.
 */
export const JUMP_PAGE_REACH = 2n ** 32n - 4096n;
/** Length of `ldr x16, #8; br x16` followed by the 8-byte target. */
export const JUMP_ABS_SIZE = 16;
/** Longest sequence `movAbs` returns, in bytes. */
export const MOV_ABS_MAX_SIZE = 16;
/** Largest distance, either way, `b` and `bl` reach: imm26 words reach 2^27 - 4 bytes forward. */
export const B_REACH = 2n ** 27n - 4n;

/** x17, the scratch register the relocated code uses as a load base (x16 carries jump targets). */
export const X17 = 17;

/** x30, the link register, where `bl` leaves the return address. */
export const X30 = 30;

/**
 * The `ldr (literal)` variants: `w`/`x` load a general register, `sw` is `ldrsw`, `s`/`d`/`q`
 * load a SIMD&FP register, `prfm` only prefetches.
 */
export type LiteralLoad = "w" | "x" | "sw" | "s" | "d" | "q" | "prfm";

/** `ldr (literal)` opcodes with imm19 and Rt zero; `opc` and `V` (bits 31:30 and 26) pick the variant. */
export const LITERAL_OPCODES: Readonly<Record<LiteralLoad, number>> = {
  w: 0x18000000, //    ldr wt, label
  x: 0x58000000, //    ldr xt, label
  sw: 0x98000000, //   ldrsw xt, label
  prfm: 0xd8000000, // prfm op, label
  s: 0x1c000000, //    ldr st, label
  d: 0x5c000000, //    ldr dt, label
  q: 0x9c000000, //    ldr qt, label
};

/** Bytes each `ldr (literal)` variant reads; `prfm` reads nothing architecturally. */
export const LITERAL_SIZES: Readonly<Record<LiteralLoad, number>> = {
  w: 4,
  x: 8,
  sw: 4,
  prfm: 0,
  s: 4,
  d: 8,
  q: 16,
};

/** The same loads from `[xn]` (unsigned-offset form, offset 0), with Rn and Rt zero. */
const BASE_LOAD_OPCODES: Readonly<Record<LiteralLoad, number>> = {
  w: 0xb9400000, //    ldr wt, [xn]
  x: 0xf9400000, //    ldr xt, [xn]
  sw: 0xb9800000, //   ldrsw xt, [xn]
  prfm: 0xf9800000, // prfm op, [xn]
  s: 0xbd400000, //    ldr st, [xn]
  d: 0xfd400000, //    ldr dt, [xn]
  q: 0x3dc00000, //    ldr qt, [xn]
};

/** The fields of `cbz`/`cbnz`: `sf` picks xt over wt. */
export interface CompareBranch {
  nonzero: boolean;
  sf: boolean;
  rt: number;
}

/** The fields of `tbz`/`tbnz`: `bit` 0–63 of register `rt`. */
export interface TestBranch {
  nonzero: boolean;
  bit: number;
  rt: number;
}

/**
 * The signed distance from `from` to `to` in words, as a `bits`-wide two's complement field, or
 * null when it does not fit.
 */
function wordOffset(from: bigint, to: bigint, bits: number): number | null {
  if (from % 4n !== 0n || to % 4n !== 0n) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `a branch from ${hex(from)} to ${hex(to)} cannot be encoded: aarch64 instructions sit at ` +
        "4-byte aligned addresses. Pass the address of an instruction.",
    );
  }
  const words = (to - from) / 4n;
  const limit = 1n << BigInt(bits - 1);
  if (words < -limit || words >= limit) return null;
  return Number(BigInt.asUintN(bits, words));
}

/** `b to` placed at `from`, or null beyond ±128 MiB. */
export function b(from: bigint, to: bigint): number | null {
  const imm26 = wordOffset(from, to, 26);
  return imm26 === null ? null : (0x14000000 | imm26) >>> 0;
}

/** `bl to` placed at `from`, or null beyond ±128 MiB. */
export function bl(from: bigint, to: bigint): number | null {
  const imm26 = wordOffset(from, to, 26);
  return imm26 === null ? null : (0x94000000 | imm26) >>> 0;
}

/**
 * `b.cond to` (`bc.cond` when `consistent`, FEAT_HBC's hint that the branch rarely changes
 * direction) placed at `from`, or null beyond ±1 MiB. `cond` is the 4-bit condition code.
 */
export function bCond(cond: number, consistent: boolean, from: bigint, to: bigint): number | null {
  const imm19 = wordOffset(from, to, 19);
  return imm19 === null ? null : (0x54000000 | (imm19 << 5) | (consistent ? 0x10 : 0) | cond) >>> 0;
}

/** `cbz`/`cbnz rt, to` placed at `from`, or null beyond ±1 MiB. */
export function cbz(branch: CompareBranch, from: bigint, to: bigint): number | null {
  const imm19 = wordOffset(from, to, 19);
  if (imm19 === null) return null;
  const sf = branch.sf ? 0x80000000 : 0;
  const op = branch.nonzero ? 0x01000000 : 0;
  return (sf | 0x34000000 | op | (imm19 << 5) | branch.rt) >>> 0;
}

/** `tbz`/`tbnz rt, #bit, to` placed at `from`, or null beyond ±32 KiB. */
export function tbz(branch: TestBranch, from: bigint, to: bigint): number | null {
  const imm14 = wordOffset(from, to, 14);
  if (imm14 === null) return null;
  const b5 = branch.bit >= 32 ? 0x80000000 : 0;
  const op = branch.nonzero ? 0x01000000 : 0;
  return (b5 | 0x36000000 | op | ((branch.bit % 32) << 19) | (imm14 << 5) | branch.rt) >>> 0;
}

/** Splits a 21-bit field into `adr`/`adrp`'s immlo (bits 30:29) and immhi (bits 23:5). */
function adrFields(opcode: number, imm21: number, rd: number): number {
  return (opcode | ((imm21 % 4) << 29) | (Math.floor(imm21 / 4) << 5) | rd) >>> 0;
}

/** `adr xd, to` placed at `from`, or null beyond ±1 MiB. */
export function adr(rd: number, from: bigint, to: bigint): number | null {
  const delta = to - from;
  if (delta < -(1n << 20n) || delta >= 1n << 20n) return null;
  return adrFields(0x10000000, Number(BigInt.asUintN(21, delta)), rd);
}

/** `adrp xd, page` placed at `from`: xd gets the 4 KiB page of `to`, or null beyond ±4 GiB. */
export function adrp(rd: number, from: bigint, to: bigint): number | null {
  const pages = (to >> 12n) - (from >> 12n);
  if (pages < -(1n << 20n) || pages >= 1n << 20n) return null;
  return adrFields(0x90000000, Number(BigInt.asUintN(21, pages)), rd);
}

/** `ldr (literal)` of kind `load` into `rt` placed at `from`, reading `to`; null beyond ±1 MiB. */
export function ldrLiteral(load: LiteralLoad, rt: number, from: bigint, to: bigint): number | null {
  const imm19 = wordOffset(from, to, 19);
  return imm19 === null ? null : (LITERAL_OPCODES[load] | (imm19 << 5) | rt) >>> 0;
}

/** The load `load` into `rt` from the address in `xn`: `ldr rt, [xn]`. */
export function ldrBase(load: LiteralLoad, rt: number, xn: number): number {
  return (BASE_LOAD_OPCODES[load] | (xn << 5) | rt) >>> 0;
}

/** `movz xd, #imm16, lsl #(16 * hw)`: the other bits of xd become zero. */
export function movz(rd: number, imm16: number, hw: number): number {
  return (0xd2800000 | (hw << 21) | (imm16 << 5) | rd) >>> 0;
}

/** `movk xd, #imm16, lsl #(16 * hw)`: the other bits of xd stay. */
export function movk(rd: number, imm16: number, hw: number): number {
  return (0xf2800000 | (hw << 21) | (imm16 << 5) | rd) >>> 0;
}

/**
 * Puts the 64-bit `value` into `xd` with `movz` and `movk`, skipping zero halfwords: at most four
 * words, and no literal in the instruction stream.
 */
export function movAbs(rd: number, value: bigint): number[] {
  const bits = BigInt.asUintN(64, value);
  const out: number[] = [];
  for (let hw = 0; hw < 4; hw++) {
    const half = Number((bits >> BigInt(16 * hw)) & 0xffffn);
    if (half !== 0) out.push(out.length === 0 ? movz(rd, half, hw) : movk(rd, half, hw));
  }
  return out.length === 0 ? [movz(rd, 0, 0)] : out;
}

/** `add xd, xn, #imm12` (xn may be sp). */
export function addImmediate(rd: number, rn: number, imm12: number): number {
  return (0x91000000 | (imm12 << 10) | (rn << 5) | rd) >>> 0;
}

/** `br xn`. */
export function br(xn: number): number {
  return (0xd61f0000 | (xn << 5)) >>> 0;
}

/** `blr xn`. */
export function blr(xn: number): number {
  return (0xd63f0000 | (xn << 5)) >>> 0;
}

/** Little-endian bytes of instruction words, then of an optional 64-bit literal. */
export function assemble(words: readonly number[], literal?: bigint): Uint8Array {
  const out = new Uint8Array(words.length * 4 + (literal === undefined ? 0 : 8));
  const view = new DataView(out.buffer);
  words.forEach((word, i) => view.setUint32(i * 4, word, true));
  if (literal !== undefined) view.setBigUint64(words.length * 4, BigInt.asUintN(64, literal), true);
  return out;
}

/** An absolute jump to `to` that reaches anywhere and writes only x16. */
export function jumpAbs(to: bigint): Uint8Array {
  return assemble(
    [
      0x58000050, // ldr x16, #8 (the literal)
      0xd61f0200, // br x16
    ],
    to, //           .quad to
  );
}

/**
 * A jump placed at `from` to `to` through the page address `adrp` forms, or null beyond its reach
 * (see `JUMP_PAGE_REACH`): three words and no literal; writes only x16.
 */
export function jumpPage(from: bigint, to: bigint): Uint8Array | null {
  const page = adrp(16, from, to);
  if (page === null) return null;
  return assemble([
    page, //                                     adrp x16, to (its page)
    addImmediate(16, 16, Number(to % 4096n)), // add x16, x16, :lo12:to
    br(16), //                                   br x16
  ]);
}

/** Size of `indirectJump`. */
export const JUMP_INDIRECT_SIZE = 8;

/** A jump placed at `from` through the 8-byte pointer at `slot` (within ±1 MiB); writes only x16. */
export function jumpIndirect(from: bigint, slot: bigint): Uint8Array {
  const load = ldrLiteral("x", 16, from, slot);
  if (load === null) throw new RangeError(`slot ${slot} beyond ±1 MiB of ${from}`);
  return assemble([
    load, //       ldr x16, slot
    br(16), //     br x16
  ]);
}
