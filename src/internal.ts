/**
 * Helpers for the tests and benchmarks, outside the public API: they reach into the machinery to
 * test the relocator on live code and to measure what patches cost.
 */
import type { NativeType } from "./signature.ts";
import type { Target } from "./target.ts";
import type { Patch } from "./patch.ts";
import { machine } from "./registry.ts";
import { apply } from "./redefine.ts";

/**
 * Redirects a function to its own trampoline: every call then runs the relocated first
 * instructions and jumps back, behaving exactly as before. It exists to test the relocator on live
 * code (every caller in the process runs relocated code).
 */
export function redefineToOriginal<const P extends readonly NativeType[], const R extends NativeType>(
  target: Target<P, R>,
): Patch<P, R> {
  return apply(target, { kind: "original" });
}

/** Executable bytes the live patches hold in the code pool (for the memory-per-patch measure). */
export function codeBytesInUse(): number {
  return machine().pool.codeBytesInUse;
}
