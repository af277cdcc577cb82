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

/** The class of an instruction. */
export type Kind = Instruction["kind"];

/**
 * The class of `word`, as `decode` gives it but without making an object: what the scans over
 * whole functions ask of every word.
 */
export function kindOf(word: number): Kind {
  // Landing pads are hints: `hint #imm`, 0xd503201f with the immediate in bits 5 to 11.
  if ((word & 0xfffff01f) >>> 0 === 0xd503201f && LANDING_PADS.has(word)) return "landingPad";
  if (((word & 0xfffffc1f) >>> 0) === 0xd65f0000) return "ret";
  if (((word & 0xfffffc1f) >>> 0) === 0xd61f0000) return "br";
  if (word >>> 16 === 0) return "udf";
  if ((word & 0x1f000000) === 0x10000000) return word >>> 31 === 0 ? "adr" : "adrp";
  // opc 11 with V set is unallocated: it traps wherever it runs.
  if ((word & 0x3b000000) === 0x18000000) return literalLoad(word) === undefined ? "normal" : "ldrLiteral";
  if ((word & 0x7c000000) === 0x14000000) return word >>> 31 === 0 ? "b" : "bl";
  if ((word & 0xff000000) >>> 0 === 0x54000000) return "bCond";
  if ((word & 0x7e000000) === 0x34000000) return "cbz";
  if ((word & 0x7e000000) === 0x36000000) return "tbz";
  if ((word & 0x7e000000) === 0x74000000) return "cmpbr";
  return "normal";
}

/** The variant of a `ldr (literal)` word, undefined for the unallocated one. */
export function literalLoad(word: number): LiteralLoad | undefined {
  return LITERAL_LOADS.get((word & 0xff000000) >>> 0);
}

/**
 * Where a PC-relative `word` of class `kind` points, in bytes from its own address (from its
 * 4 KiB page for `adrp`); 0 for the classes that point nowhere.
 */
export function displacement(word: number, kind: Kind): number {
  switch (kind) {
    case "adr":
      return signedField(word, 5, 19) * 4 + ((word >>> 29) & 3);
    case "adrp":
      return (signedField(word, 5, 19) * 4 + ((word >>> 29) & 3)) * 4096;
    case "ldrLiteral":
    case "bCond":
    case "cbz":
      return signedField(word, 5, 19) * 4;
    case "b":
    case "bl":
      return signedField(word, 0, 26) * 4;
    case "tbz":
      return signedField(word, 5, 14) * 4;
    case "cmpbr":
      return signedField(word, 5, 9) * 4;
    default:
      return 0;
  }
}

/** Classifies the instruction `word` found at `address`. */
export function decode(word: number, address: bigint): Instruction {
  const kind = kindOf(word);
  const rd = word & 0x1f;
  const target = offset(address, displacement(word, kind));
  const nonzero = (word & 0x01000000) !== 0;
  const sf = word >>> 31 === 1;
  switch (kind) {
    case "landingPad":
      return { word, address, kind, pad: LANDING_PADS.get(word)! };
    case "ret":
    case "br":
      return { word, address, kind, rn: (word >>> 5) & 0x1f };
    case "udf":
      return { word, address, kind, imm16: word };
    case "adr":
      return { word, address, kind, rd, target };
    case "adrp":
      return { word, address, kind, rd, target: offset(address - address % 4096n, displacement(word, kind)) };
    case "ldrLiteral":
      return { word, address, kind, load: literalLoad(word)!, rt: rd, target };
    case "b":
    case "bl":
    case "cmpbr":
      return { word, address, kind, target };
    case "bCond":
      return { word, address, kind, cond: word & 0xf, consistent: (word & 0x10) !== 0, target };
    case "cbz":
      return { word, address, kind, branch: { nonzero, sf, rt: rd }, target };
    case "tbz":
      return { word, address, kind, branch: { nonzero, bit: (sf ? 32 : 0) + ((word >>> 19) & 0x1f), rt: rd }, target };
    default:
      return { word, address, kind: "normal" };
  }
}

/** Decodes the little-endian word at `byteOffset` of `code`, which starts at `address`. */
export function decodeAt(code: Uint8Array, byteOffset: number, address: bigint): Instruction {
  const word = new DataView(code.buffer, code.byteOffset, code.byteLength).getUint32(byteOffset, true);
  return decode(word, address + BigInt(byteOffset));
}

/** True for the classes whose target is a place execution may continue at. */
export function isBranch(instruction: Instruction): instruction is Branch {
  return isBranchKind(instruction.kind);
}

/** True for the classes whose target is a place execution may continue at. */
export function isBranchKind(kind: Kind): boolean {
  switch (kind) {
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
