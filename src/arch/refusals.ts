/**
 * The two ways relocation says no, shared by every instruction set: an instruction that cannot
 * move (`UNRELOCATABLE`), and a function too short for the patch (`FUNCTION_TOO_SHORT`).
 */
import { hex, RedefineError } from "../errors.ts";

/**
 * The error for an instruction that stops `redefine` from moving a function's first instructions:
 * `instruction` shows it as the arch prints it (its bytes, or its word and class); `reason` says
 * why, in lower case.
 *
 * @example
 * ```ts
 * import { unrelocatable } from "./refusals.ts";
 * const error = unrelocatable(0x1000n, "e2 fe", "loop leaves the copied bytes");
 * console.log(error.code); // "UNRELOCATABLE"
 * ```
 */
export function unrelocatable(address: bigint, instruction: string, reason: string): RedefineError {
  return new RedefineError(
    "UNRELOCATABLE",
    `the instruction at ${hex(address)} (${instruction}): ${reason}, so the start of the function ` +
      "cannot be relocated. Pass a native replacement that does not call the original, or patch a " +
      "different function.",
  );
}

/**
 * The error for a function of `has` bytes when the patch needs `needs`.
 *
 * @example
 * ```ts
 * import { tooShort } from "./refusals.ts";
 * console.log(tooShort(0x1000n, 3, 5).code); // "FUNCTION_TOO_SHORT"
 * ```
 */
export function tooShort(address: bigint, has: number, needs: number): RedefineError {
  return new RedefineError(
    "FUNCTION_TOO_SHORT",
    `the function at ${hex(address)} has ${has} bytes, and patching it needs ${needs}: patch a ` +
      "larger function, or the function that calls this one.",
  );
}
