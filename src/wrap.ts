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
import { transaction } from "./transaction.ts";

/**
 * Redefines `target` with the function `replacement` makes from the original: every caller of
 * `target` runs it until the patch is restored, and it calls the real function through the
 * `original` it was given (the patch's `original`, at the runtime's full FFI speed). `replacement`
 * runs once, before the entry jump is written; `original` may be called from the function it
 * returns, not while making it. Parameter names come from the target's type when its parameter
 * tuple is labeled (`Target<[n: "i64"], "i64">`). Throws like `redefine()`, and `UNRELOCATABLE`
 * when the original cannot be kept callable; nothing is written then.
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
  // The function `replacement` gets must exist before the patch does; it forwards to the patch's
  // original, bound inside the transaction: before the entry jump is written, so before any call.
  let call = (..._: JsArguments<P>): JsValue<R> => {
    throw new RedefineError(
      "BAD_REPLACEMENT",
      `wrap()'s replacement called 'original' while making its function: call it from the ` +
        `function it returns.`,
    );
  };
  const made = replacement((...args) => call(...args));
  return transaction(() => {
    const patch = redefine(target, made);
    call = patch.original;
    return patch;
  });
}
