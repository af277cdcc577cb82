/**
 * `wrap()`: a redefinition whose replacement is made from the original, so that TypeScript infers
 * every type. `redefine(target, (x) => patch.original(x))` refers to the patch in its own
 * initializer, which TypeScript cannot type without an annotation (TS7022); here the original
 * comes in as a parameter instead.
 */
import { RedefineError } from "./errors.ts";
import type { JsArguments, JsFunction, JsValue, NativeType } from "./signature.ts";
import type { Target } from "./target.ts";
import type { Patch } from "./patch.ts";
import { redefine } from "./redefine.ts";
import { refuseUncallable } from "./replacement.ts";
import { transaction } from "./transaction.ts";

/**
 * Redefines `target` with the function `replacement` makes from the original: every caller of
 * `target` runs it until the patch is restored, and it calls the real function through the
 * `original` it was given — the patch's own `original`, at the runtime's full FFI speed.
 * `replacement` runs once, after the patch is laid out and before its entry jump is written (so
 * `original` may be called already: the function as it is). Parameter names come from the target's
 * type when its parameter tuple is labeled (`Target<[n: "i64"], "i64">`). Throws like `redefine()`,
 * and `BAD_REPLACEMENT` when `replacement` returns no function of the signature; nothing is
 * written when it throws.
 *
 * @example
 * ```ts
 * import { wrap } from "@redefine/redefine";
 * using labs = wrap(
 *   { symbol: "labs", parameters: ["i64"], result: "i64" },
 *   (original) => (x) => original(x) * 2n,
 * );
 * labs.original(-21n); // 21n; every native caller of labs gets 42n
 * ```
 */
export function wrap<const P extends readonly NativeType[], const R extends NativeType>(
  target: Target<P, R>,
  replacement: (
    original: (...args: JsArguments<P>) => JsValue<R>,
  ) => NoInfer<JsFunction<{ parameters: P; result: R }>>,
): Patch<P, R> {
  // The callback must exist before the patch, and the patch's original before the replacement: the
  // callback forwards to the replacement, made inside the transaction, so before the entry jump is
  // written and any call. The forwarding is a JS-to-JS call; `original` stays the patch's own, a
  // stub each call site of it sees alone (a forwarder shared by every wrap would make those call
  // sites polymorphic, off the runtime's fast FFI path).
  let made: JsFunction<{ parameters: P; result: R }>;
  return transaction(() => {
    const patch = redefine(target, (...args: JsArguments<P>) => made(...args));
    made = replacement(patch.original);
    if (typeof made !== "function" || made.length > patch.signature.parameters.length) {
      throw new RedefineError(
        "BAD_REPLACEMENT",
        `wrap()'s replacement must return a JS function of at most ${patch.signature.parameters.length} ` +
          `parameters to run instead, not ${typeof made === "function" ? `one of ${made.length}` : typeof made}.`,
      );
    }
    // redefine() saw only the forwarder: what the forwarder calls must answer synchronously too.
    refuseUncallable(made);
    return patch;
  });
}
