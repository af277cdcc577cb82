/**
 * AArch64 instruction classifier: sorts a 32-bit word into what the relocator must treat apart
 * (the PC-relative classes, with their absolute target and the fields needed to re-encode them)
 * and everything else, which runs the same at any address.
 */
import { type CompareBranch, LITERAL_OPCODES, type LiteralLoad, type TestBranch } from "./writer.ts";

/** The hint-space landing pads a function entry may start with. */
export type LandingPad = "bti" | "bti c" | "bti j" | "bti jc" | "paciasp" | "pacibsp";

const LANDING_PADS: ReadonlyMap<number, LandingPad> = new Map([
  [0xd503241f, "bti"],
  [0xd503245f, "bti c"],
  [0xd503249f, "bti j"],
  [0xd50324df, "bti jc"],
  [0xd503233f, "paciasp"],
  [0xd503237f, "pacibsp"],
]);

/** One decoded instruction: its word and address, and the fields of its class. */
export type Instruction =
  & { word: number; address: bigint }
  & (
    | { kind: "normal" }
    | { kind: "landingPad"; pad: LandingPad }
    | { kind: "ret" | "br"; rn: number }
    | { kind: "udf"; imm16: number }
    | { kind: "adr" | "adrp"; rd: number; target: bigint }
    | { kind: "ldrLiteral"; load: LiteralLoad; rt: number; target: bigint }
    | { kind: "b" | "bl"; target: bigint }
    | { kind: "bCond"; cond: number; consistent: boolean; target: bigint }
    | { kind: "cbz"; branch: CompareBranch; target: bigint }
    | { kind: "tbz"; branch: TestBranch; target: bigint }
    // FEAT_CMPBR's compare-and-branch (cbgt, cbhi...): known only so it can be refused.
    | { kind: "cmpbr"; target: bigint }
  );

/** The classes whose `target` is a place execution may continue at. */
export type Branch = Extract<Instruction, { kind: "b" | "bl" | "bCond" | "cbz" | "tbz" | "cmpbr" }>;

const LITERAL_LOADS: ReadonlyMap<number, LiteralLoad> = new Map(
  (Object.entries(LITERAL_OPCODES) as [LiteralLoad, number][]).map(([load, opcode]) => [opcode, load]),
);

/** The value of the `bits`-wide field at `shift`, read as two's complement. */
function signedField(word: number, shift: number, bits: number): number {
  const field = Math.floor(word / 2 ** shift) % 2 ** bits;
  return field >= 2 ** (bits - 1) ? field - 2 ** bits : field;
}

/** `address + delta`, wrapped to 64 bits as the CPU does. */
function offset(address: bigint, delta: number): bigint {
  return BigInt.asUintN(64, address + BigInt(delta));
}

/** Classifies the instruction `word` found at `address`. */
export function decode(word: number, address: bigint): Instruction {
  const at = { word, address };
  const rd = word & 0x1f;
  const pad = LANDING_PADS.get(word);
  if (pad !== undefined) return { ...at, kind: "landingPad", pad };
  if (((word & 0xfffffc1f) >>> 0) === 0xd65f0000) return { ...at, kind: "ret", rn: (word >>> 5) & 0x1f };
  if (((word & 0xfffffc1f) >>> 0) === 0xd61f0000) return { ...at, kind: "br", rn: (word >>> 5) & 0x1f };
  if (word >>> 16 === 0) return { ...at, kind: "udf", imm16: word };

  if ((word & 0x1f000000) === 0x10000000) {
    const imm21 = signedField(word, 5, 19) * 4 + ((word >>> 29) & 3);
    if (word >>> 31 === 0) return { ...at, kind: "adr", rd, target: offset(address, imm21) };
    const page = address - address % 4096n;
    return { ...at, kind: "adrp", rd, target: offset(page, imm21 * 4096) };
  }
  if ((word & 0x3b000000) === 0x18000000) {
    const load = LITERAL_LOADS.get((word & 0xff000000) >>> 0);
    // opc 11 with V set is unallocated: it traps wherever it runs.
    if (load === undefined) return { ...at, kind: "normal" };
    return { ...at, kind: "ldrLiteral", load, rt: rd, target: offset(address, signedField(word, 5, 19) * 4) };
  }
  if ((word & 0x7c000000) === 0x14000000) {
    const target = offset(address, signedField(word, 0, 26) * 4);
    return { ...at, kind: word >>> 31 === 0 ? "b" : "bl", target };
  }
  if ((word & 0xff000000) >>> 0 === 0x54000000) {
    return {
      ...at,
      kind: "bCond",
      cond: word & 0xf,
      consistent: (word & 0x10) !== 0,
      target: offset(address, signedField(word, 5, 19) * 4),
    };
  }
  const sf = word >>> 31 === 1;
  const nonzero = (word & 0x01000000) !== 0;
  if ((word & 0x7e000000) === 0x34000000) {
    const target = offset(address, signedField(word, 5, 19) * 4);
    return { ...at, kind: "cbz", branch: { nonzero, sf, rt: rd }, target };
  }
  if ((word & 0x7e000000) === 0x36000000) {
    const bit = (sf ? 32 : 0) + ((word >>> 19) & 0x1f);
    const target = offset(address, signedField(word, 5, 14) * 4);
    return { ...at, kind: "tbz", branch: { nonzero, bit, rt: rd }, target };
  }
  if ((word & 0x7e000000) === 0x74000000) {
    return { ...at, kind: "cmpbr", target: offset(address, signedField(word, 5, 9) * 4) };
  }
  return { ...at, kind: "normal" };
}

/** Decodes the little-endian word at `byteOffset` of `code`, which starts at `address`. */
export function decodeAt(code: Uint8Array, byteOffset: number, address: bigint): Instruction {
  const word = new DataView(code.buffer, code.byteOffset, code.byteLength).getUint32(byteOffset, true);
  return decode(word, address + BigInt(byteOffset));
}

/** True for the classes whose target is a place execution may continue at. */
export function isBranch(instruction: Instruction): instruction is Branch {
  switch (instruction.kind) {
    case "b":
    case "bl":
    case "bCond":
    case "cbz":
    case "tbz":
    case "cmpbr":
      return true;
    default:
      return false;
  }
}
