/**
 * The instruction-set layer: everything `redefine` needs to know about machine code, as pure
 * functions (bytes and addresses in, bytes out). One implementation per architecture, chosen by
 * `archFor()`.
 */
import { RedefineError } from "../errors.ts";
import { x86_64 } from "./x86_64/mod.ts";

/** Where the relocated prologue ends up and how much of the original it covers. */
export interface RelocationPlan {
  /** Bytes of the original code, from the patch point, that the relocated copy replaces. */
  consumed: number;
  /** Upper bound of the trampoline's size (relocated code plus the jump back), wherever it lands. */
  maxSize: number;
}

/** What `src/` asks of an instruction set. */
export interface Arch {
  readonly name: "x86_64" | "aarch64";
  /** Largest distance, either way, a near entry jump covers. */
  readonly nearReach: bigint;
  /** Size of the near entry jump (`jmp rel32`, `b imm26`). */
  readonly nearJumpSize: number;
  /** Size of the absolute jump written when no near memory can be had. */
  readonly farJumpSize: number;
  /** Alignment of instructions, and of code this library writes. */
  readonly codeAlignment: number;
  /** Bytes at the entry that must stay in place (`endbr64`, `bti c`): the patch goes after them. */
  landingPadLength(code: Uint8Array): number;
  /** The near entry jump from `from` to `to`, or null when out of reach. */
  nearJump(from: bigint, to: bigint): Uint8Array | null;
  /** An absolute jump placed at `from` that reaches `to` anywhere and clobbers no argument register. */
  farJump(from: bigint, to: bigint): Uint8Array;
  /**
   * Decides how many whole instructions from `address` must move to free `minLength` bytes, and
   * how large their relocated copy can get. Throws `UNRELOCATABLE` for what cannot be moved.
   * `code` holds the bytes from `address` to the end of the function's known extent.
   */
  planRelocation(code: Uint8Array, address: bigint, minLength: number): RelocationPlan;
  /**
   * The trampoline for `trampoline`: the instructions of the plan, rewritten to run there, then a
   * jump back to `address + consumed`. At most `plan.maxSize` bytes.
   */
  relocate(code: Uint8Array, address: bigint, minLength: number, trampoline: bigint): Uint8Array;
}

/** The instruction set for a CPU architecture name as the runtimes report it. */
export function archFor(arch: string): Arch {
  switch (arch) {
    case "x86_64":
    case "x64":
      return x86_64;
    default:
      throw new RedefineError(
        "UNSUPPORTED_PLATFORM",
        `redefine supports x86_64 and aarch64 CPUs, not '${arch}'.`,
      );
  }
}
