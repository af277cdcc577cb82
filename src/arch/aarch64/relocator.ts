/**
 * The AArch64 relocator: moves the first whole instructions of a function into a trampoline,
 * rewrites each PC-relative one to reach the same place from there, and refuses what cannot move.
 * A `bl` may only end the moved words: x30 gets the original return address. Scratch registers:
 * x16 for far jumps, x17 as the base of relocated literal loads.
 *
 * Far jumps into the function's own code (the jump back, and moved branches out of `b`'s reach)
 * land where no landing pad is, mid-function: into pages guarded by Branch Target Identification
 * (PROT_BTI, which glibc's loader gives the text of every library built with
 * `-mbranch-protection=standard`), a `br` there faults (SIGILL). So there they go by `ret x16`,
 * which BTI does not check; only the Guarded Control Stack checks it, and with both on such a
 * jump is refused (`BRANCH_PROTECTION`). The trampoline is placed within `b`'s reach wherever
 * memory there can be had (src/layout.ts), so these are the exception.
 */
import { concat } from "../bytes.ts";
import { hex, RedefineError, spanText } from "../../errors.ts";
import { tooShort, unrelocatable } from "../refusals.ts";
import { type BranchChecks, type RelocationPlan, UNCHECKED } from "../types.ts";
import {
  type Branch,
  decodeAt,
  displacement,
  type Instruction,
  isBranch,
  isBranchKind,
  type Kind,
  kindOf,
  literalLoad,
} from "./decoder.ts";
import {
  adr,
  adrp,
  assemble,
  b,
  bCond,
  cbz,
  B_REACH,
  JUMP_ABS_SIZE,
  jumpAbs,
  jumpAbsUnchecked,
  ldrBase,
  ldrLiteral,
  LITERAL_SIZES,
  MOV_ABS_MAX_SIZE,
  movAbs,
  tbz,
  X17,
  X30,
} from "./writer.ts";

/** The instructions to move and the bytes they span. */
interface Analysis {
  instructions: Instruction[];
  consumed: number;
}

/** The refusal naming the instruction `word` of class `kind` at `address`. */
function refusal(address: bigint, word: number, kind: Kind, why: string): RedefineError {
  return unrelocatable(address, `0x${word.toString(16).padStart(8, "0")}, ${kind}`, why);
}

/**
 * Picks the whole words covering `minLength` bytes and checks the function's known extent for
 * anything the patch would break: code that jumps or points into the overwritten words from
 * outside them, or reads them as data. The scan works in offsets from `address`, plain numbers.
 */
function analyse(code: Uint8Array, address: bigint, minLength: number): Analysis {
  if (address % 4n !== 0n) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `${hex(address)} is not 4-byte aligned, so it is not the address of aarch64 code. Pass the ` +
        "address of the function's first instruction.",
    );
  }
  const consumed = Math.ceil(minLength / 4) * 4;
  if (code.length < consumed) throw tooShort(address, code.length, consumed);
  const view = new DataView(code.buffer, code.byteOffset, code.byteLength);
  for (let at = 0; at + 4 <= code.length; at += 4) {
    const word = view.getUint32(at, true);
    const kind = kindOf(word);
    const found = hazard(word, kind, at, consumed);
    if (found !== NO_HAZARD) {
      throw refusal(address + BigInt(at), word, kind, hazardText(found, address, at, word, kind, consumed));
    }
  }
  const instructions: Instruction[] = [];
  for (let at = 0; at < consumed; at += 4) instructions.push(decodeAt(code, at, address));
  return { instructions, consumed };
}

const NO_HAZARD = 0, CALL_INTO = 1, CMPBR = 2, JUMP_INTO = 3, ADR_INTO = 4, LOAD_FROM = 5;

/**
 * What the word at offset `at` of the function does that forbids moving its first `consumed`
 * bytes, if anything. Plain numbers: this runs on every word of the function.
 */
function hazard(word: number, kind: Kind, at: number, consumed: number): number {
  const moved = at < consumed;
  const target = at + displacement(word, kind);
  const strictlyInside = target > 0 && target < consumed;
  // The callee must find the original return address in x30, and only the word after the moved
  // ones is still there to return to.
  if (kind === "bl" && moved && at + 4 < consumed) return CALL_INTO;
  if (kind === "cmpbr" && moved) return CMPBR;
  // A branch among the moved words that targets them stays internal to the trampoline.
  if (isBranchKind(kind) && !moved && strictlyInside) return JUMP_INTO;
  if (kind === "adr" && strictlyInside) return ADR_INTO;
  if (kind === "ldrLiteral") {
    const size = LITERAL_SIZES[literalLoad(word)!];
    if (size > 0 && target < consumed && target + size > 0) return LOAD_FROM;
  }
  return NO_HAZARD;
}

/** Why `hazard` refused the word at offset `at` of the function at `address`. */
function hazardText(found: number, address: bigint, at: number, word: number, kind: Kind, consumed: number): string {
  const overwritten = `inside the ${consumed} bytes the patch overwrites at ${hex(address)}`;
  const target = hex(address + BigInt(at + displacement(word, kind)));
  switch (found) {
    case CALL_INTO:
      return `it is a call returning to ${hex(address + BigInt(at + 4))}, ${overwritten}`;
    case CMPBR:
      return "it is a FEAT_CMPBR compare-and-branch, which cannot be relocated yet";
    case JUMP_INTO:
      return `it jumps to ${target}, ${overwritten}`;
    case ADR_INTO:
      return `it takes the address ${target}, ${overwritten}`;
    default:
      return `it reads data at ${target}, ${overwritten}`;
  }
}

/** The shortest jump from `at` to `target` that `checks` let land there. */
function jump(at: bigint, target: bigint, checks: BranchChecks): Uint8Array {
  const near = b(at, target);
  if (near !== null) return assemble([near]);
  return farJump(at, target, checks);
}

/** A jump from `at` to `target` beyond `b`'s reach. */
function farJump(at: bigint, target: bigint, checks: BranchChecks): Uint8Array {
  if (!checks.landingPads) return jumpAbs(target);
  if (!checks.shadowStack) return jumpAbsUnchecked(target);
  throw new RedefineError(
    "BRANCH_PROTECTION",
    `the original would jump from ${hex(at)} to ${hex(target)}, farther than a b reaches (${spanText(B_REACH)}), ` +
      "into code that arm64 Branch Target Identification guards, where an indirect br must land " +
      "on a landing pad and finds none; the other way, ret x16, is refused by the Guarded Control " +
      "Stack this process runs with. Leave memory free within that reach of the function, run " +
      "without GCS (GLIBC_TUNABLES=glibc.cpu.aarch64_gcs=0), or pass a native replacement that " +
      "does not call the original.",
  );
}

/**
 * A conditional branch at `at` to `target`: itself re-targeted when in reach, else its inverse
 * stepping over a `b`, else over an absolute jump.
 */
function conditional(
  at: bigint,
  target: bigint,
  checks: BranchChecks,
  encode: (from: bigint, to: bigint) => number | null,
  encodeInverse: (from: bigint, to: bigint) => number | null,
): Uint8Array {
  const same = encode(at, target);
  if (same !== null) return assemble([same]);
  const near = b(at + 4n, target);
  if (near !== null) return assemble([encodeInverse(at, at + 8n)!, near]);
  const far = farJump(at + 4n, target, checks);
  return concat([assemble([encodeInverse(at, at + 4n + BigInt(far.length))!]), far]);
}

/** A compare- or test-and-branch at `at` to `target`: its inverse is the same with `nonzero` flipped. */
function flippable<T extends { nonzero: boolean }>(
  at: bigint,
  target: bigint,
  checks: BranchChecks,
  branch: T,
  encode: (branch: T, from: bigint, to: bigint) => number | null,
): Uint8Array {
  const inverse = { ...branch, nonzero: !branch.nonzero };
  return conditional(
    at,
    target,
    checks,
    (from, to) => encode(branch, from, to),
    (from, to) => encode(inverse, from, to),
  );
}

/** `instruction`, rewritten to run at `at` and reach the same target, as `checks` let it. */
function rewrite(instruction: Instruction, at: bigint, checks: BranchChecks): Uint8Array {
  switch (instruction.kind) {
    case "adr":
    case "adrp": {
      const encode = instruction.kind === "adr" ? adr : adrp;
      const near = encode(instruction.rd, at, instruction.target);
      return assemble(near === null ? movAbs(instruction.rd, instruction.target) : [near]);
    }
    case "ldrLiteral": {
      const { load, rt, target } = instruction;
      const near = ldrLiteral(load, rt, at, target);
      if (near !== null) return assemble([near]);
      // A general-register load can use its own destination as the base; register 31 would be
      // sp as a base, and prfm and SIMD loads have no general destination.
      const ownBase = (load === "w" || load === "x" || load === "sw") && rt !== 31;
      const base = ownBase ? rt : X17;
      return assemble([...movAbs(base, target), ldrBase(load, rt, base)]);
    }
    case "b":
      return jump(at, instruction.target, checks);
    case "bl": {
      // The last moved word (analyse() refuses others): x30 gets the original return address, the
      // first word left in place, so the callee returns straight there and sees what it would.
      const link = assemble(movAbs(X30, instruction.address + 4n));
      return concat([link, jump(at + BigInt(link.length), instruction.target, checks)]);
    }
    case "bCond": {
      const { cond, consistent, target } = instruction;
      const encode = (from: bigint, to: bigint) => bCond(cond, consistent, from, to);
      // Conditions 14 and 15 both mean "always": they have no inverse.
      if (cond >= 14) {
        const same = encode(at, target);
        return same === null ? jump(at, target, checks) : assemble([same]);
      }
      return conditional(at, target, checks, encode, (from, to) => bCond(cond ^ 1, consistent, from, to));
    }
    case "cbz":
      return flippable(at, instruction.target, checks, instruction.branch, cbz);
    case "tbz":
      return flippable(at, instruction.target, checks, instruction.branch, tbz);
    default:
      return assemble([instruction.word]);
  }
}

/** The most bytes `rewrite` can make of `instruction`, wherever it lands. */
function worstCase(instruction: Instruction, internal: boolean): number {
  if (internal) return 4;
  switch (instruction.kind) {
    case "adr":
    case "adrp":
      return MOV_ABS_MAX_SIZE;
    case "ldrLiteral":
      return MOV_ABS_MAX_SIZE + 4;
    case "b":
      return JUMP_ABS_SIZE;
    case "bl":
      return MOV_ABS_MAX_SIZE + JUMP_ABS_SIZE;
    case "bCond":
    case "cbz":
    case "tbz":
      return 4 + JUMP_ABS_SIZE;
    default:
      return 4;
  }
}

/** A test for branches whose target lies within the moved words `[address, address + consumed)`. */
function internalTo(address: bigint, consumed: number): (instruction: Instruction) => instruction is Branch {
  const end = address + BigInt(consumed);
  return (instruction): instruction is Branch =>
    isBranch(instruction) && instruction.target >= address && instruction.target < end;
}

/** See `Arch.planRelocation`. */
export function planRelocation(
  code: Uint8Array,
  address: bigint,
  minLength: number,
): RelocationPlan<Instruction> {
  const { instructions, consumed } = analyse(code, address, minLength);
  const internal = internalTo(address, consumed);
  const maxSize = instructions.reduce(
    (sum, instruction) => sum + worstCase(instruction, internal(instruction)),
    endsInCall(instructions) ? 0 : JUMP_ABS_SIZE,
  );
  return { address, consumed, maxSize, instructions };
}

/** See `Arch.relocate`. */
export function relocate(
  plan: RelocationPlan<Instruction>,
  trampoline: bigint,
  checks: BranchChecks = UNCHECKED,
): Uint8Array {
  const { address, consumed, instructions } = plan;
  const internal = internalTo(address, consumed);

  // An internal branch stays one word, its target being a few words away, so aiming it at
  // itself gives its size before the positions of the words it targets are known.
  const starts: bigint[] = [];
  let at = trampoline;
  for (const instruction of instructions) {
    starts.push(at);
    at += BigInt(rewrite(internal(instruction) ? { ...instruction, target: at } : instruction, at, checks).length);
  }
  const moved = instructions.map((instruction, i) => {
    if (!internal(instruction)) return rewrite(instruction, starts[i]!, checks);
    return rewrite(
      { ...instruction, target: starts[Number((instruction.target - address) / 4n)]! },
      starts[i]!,
      checks,
    );
  });
  if (!endsInCall(instructions)) moved.push(jump(at, address + BigInt(consumed), checks));
  return concat(moved);
}

/** True when the moved words end with a `bl`: the callee returns to the original, no jump back. */
function endsInCall(instructions: readonly Instruction[]): boolean {
  return instructions[instructions.length - 1]?.kind === "bl";
}
