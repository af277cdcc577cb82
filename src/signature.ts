/**
 * The portable signature vocabulary (Deno's type names) and the JS types a replacement sees.
 * 64-bit integers are `bigint` on both runtimes; pointers are `bigint` addresses (0n for NULL).
 */
import { RedefineError } from "./errors.ts";

/**
 * A native type name, the same on Deno and Bun.
 *
 * @example
 * ```ts
 * import type { NativeType } from "@redefine/redefine";
 * const types: NativeType[] = ["i64", "pointer", "f64"];
 * ```
 */
export type NativeType =
  | "i8" | "u8" | "i16" | "u16" | "i32" | "u32" | "i64" | "u64"
  | "usize" | "isize" | "f32" | "f64" | "bool" | "pointer" | "buffer" | "function" | "void";

/**
 * A function's parameters and result.
 *
 * @example
 * ```ts
 * import type { Signature } from "@redefine/redefine";
 * const strlen: Signature = { parameters: ["pointer"], result: "u64" };
 * ```
 */
export interface Signature {
  /** The parameter types, in order. */
  readonly parameters: readonly NativeType[];
  /** The result type (`"void"` for none). */
  readonly result: NativeType;
}

/**
 * The JS value a native value of type `T` becomes, on both runtimes.
 *
 * @example
 * ```ts
 * import type { JsValue } from "@redefine/redefine";
 * const address: JsValue<"pointer"> = 0n; // pointers are bigint addresses, 0n for NULL
 * ```
 */
export type JsValue<T extends NativeType> = T extends "i64" | "u64" | "usize" | "isize" ? bigint
  : T extends "pointer" | "function" | "buffer" ? bigint
  : T extends "f32" | "f64" | "i8" | "u8" | "i16" | "u16" | "i32" | "u32" ? number
  : T extends "bool" ? boolean
  : T extends "void" ? void
  : never;

/** What `original(...)` accepts for a parameter of type `T`: a buffer may also be bytes. */
export type JsArgument<T extends NativeType> = T extends "buffer" ? bigint | Uint8Array
  : JsValue<T>;

/**
 * The JS arguments of a signature's parameters, as a tuple.
 *
 * @example
 * ```ts
 * import type { JsParameters } from "@redefine/redefine";
 * const args: JsParameters<["i32", "i64"]> = [1, 2n];
 * ```
 */
export type JsParameters<P extends readonly NativeType[]> = { [K in keyof P]: JsValue<P[K]> };

/**
 * The JS arguments `original(...)` takes: the same as a replacement receives (pointers and buffers
 * as `bigint` addresses).
 *
 * @example
 * ```ts
 * import type { JsArguments } from "@redefine/redefine";
 * const args: JsArguments<["pointer", "usize"]> = [0x1000n, 16n];
 * ```
 */
export type JsArguments<P extends readonly NativeType[]> = JsParameters<P>;

/**
 * A JS function with the shape of a signature.
 *
 * @example
 * ```ts
 * import type { JsFunction } from "@redefine/redefine";
 * const double: JsFunction<{ parameters: ["i64"]; result: "i64" }> = (x) => x * 2n;
 * ```
 */
export type JsFunction<S extends Signature> = (
  ...args: JsParameters<S["parameters"]>
) => JsValue<S["result"]>;

const TYPES: ReadonlySet<string> = new Set([
  "i8", "u8", "i16", "u16", "i32", "u32", "i64", "u64", "usize", "isize",
  "f32", "f64", "bool", "pointer", "buffer", "function", "void",
]);

/** Checks a signature coming from user code (which may not be typed) and returns it. */
export function checkSignature(signature: Signature, what: string): Signature {
  if (!signature || !Array.isArray(signature.parameters)) {
    throw new RedefineError(
      "BAD_SIGNATURE",
      `${what}: 'parameters' must be an array of native type names, e.g. { parameters: ["i32"], result: "i64" }.`,
    );
  }
  // Checked in place: a signature is checked on every patch, and its message is built only for a
  // bad one.
  const { parameters, result } = signature;
  let bad = 0;
  while (bad < parameters.length && TYPES.has(parameters[bad] as string)) bad++;
  if (bad === parameters.length && TYPES.has(result as string)) bad = -1;
  if (bad >= 0) {
    const [name, type] = bad < parameters.length ? [`parameters[${bad}]`, parameters[bad]] : ["result", result];
    throw new RedefineError(
      "BAD_SIGNATURE",
      `${what}: ${name} is '${String(type)}', not a native type. Use one of: ${[...TYPES].join(", ")}.`,
    );
  }
  if (signature.parameters.includes("void")) {
    throw new RedefineError("BAD_SIGNATURE", `${what}: 'void' is only valid as a result type.`);
  }
  return signature;
}
