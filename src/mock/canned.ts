/**
 * Canned replacements: `returns(value)` and `sequence(...values)` stand for native code that
 * answers every call itself, never entering JS, so they are safe on every thread and for functions
 * the runtime itself calls. `cannedSpec()` turns one into the instruction-set layer's spec once the
 * target's result type is known (src/arch/canned.ts), checking that every value fits it.
 */
import { RedefineError } from "../errors.ts";
import type { NativeType } from "../signature.ts";
import type { CannedSpec, CannedValue } from "../arch/canned.ts";
import { CANNED_DATA } from "../arch/canned.ts";

/**
 * A native replacement that answers calls without running JS: made by `returns()` and
 * `sequence()`, passed to `redefine()` as the replacement.
 *
 * @example
 * ```ts
 * import { returns } from "./mod.ts";
 * import type { Canned } from "./mod.ts";
 * const answer: Canned<number> = returns(42);
 * console.log(answer.values); // [ 42 ]
 * ```
 */
export interface Canned<V> {
  /** `"returns"`: every call returns the one value; `"sequence"`: each call the next, the last repeating. */
  readonly canned: "returns" | "sequence";
  /** The values, in the JS types of the target's result (integers of 64 bits as `bigint`). */
  readonly values: readonly V[];
}

/**
 * A native replacement whose every call returns `value`: pass it to `redefine()`. The value has the
 * JS type of the target's result (`number`, `bigint` for 64-bit integers and pointers, `boolean`);
 * the patch's `calls` counts the calls, natively.
 *
 * @example
 * ```ts
 * import { redefine, returns } from "./mod.ts";
 * using patch = redefine({ symbol: "getppid", parameters: [], result: "i32" }, returns(42));
 * // every caller of getppid, on any thread, now gets 42; patch.calls counts them
 * ```
 */
export function returns<V>(value: V): Canned<V> {
  return Object.freeze({ canned: "returns", values: Object.freeze([value]) });
}

/** How many values a sequence may hold (8 bytes of code each). */
export const SEQUENCE_LIMIT = 65_536;

/**
 * A native replacement whose calls return `values` in order, the last one repeating. Concurrent
 * callers each take a distinct step (the step is an atomic counter, the patch's `calls`).
 *
 * @example
 * ```ts
 * import { redefine, sequence } from "./mod.ts";
 * using patch = redefine({ symbol: "getppid", parameters: [], result: "i32" }, sequence(1, 2, 3));
 * // getppid() now returns 1, then 2, then 3, 3, 3, ...
 * ```
 */
export function sequence<V>(first: V, ...rest: V[]): Canned<V> {
  return Object.freeze({ canned: "sequence", values: Object.freeze([first, ...rest]) });
}

/** True for what `returns()` and `sequence()` made. */
export function isCanned(replacement: unknown): replacement is Canned<unknown> {
  const r = replacement as Canned<unknown> | null;
  return typeof r === "object" && r !== null && (r.canned === "returns" || r.canned === "sequence") &&
    Array.isArray(r.values);
}

/** The spec of `canned`'s code for a function whose result is of type `result`. */
export function cannedSpec(canned: Canned<unknown>, result: NativeType): CannedSpec {
  const { values } = canned;
  if (canned.canned === "returns") return { kind: "returns", value: cannedValue(result, values[0], "returns()") };
  if (result === "void") {
    throw new RedefineError(
      "BAD_REPLACEMENT",
      "sequence() for a function returning void has nothing to return: use returns(undefined) to count calls.",
    );
  }
  if (values.length === 0 || values.length > SEQUENCE_LIMIT) {
    throw new RedefineError(
      "BAD_REPLACEMENT",
      `sequence() takes 1 to ${SEQUENCE_LIMIT} values, not ${values.length}.`,
    );
  }
  return { kind: "sequence", values: values.map((v, i) => cannedValue(result, v, `sequence() value ${i}`)) };
}

/**
 * The first contents of a canned replacement's data block: the call counter at zero, and the
 * original its code falls back on where it needs one — a clock's code calls it for the clocks it
 * does not fake, or to read the real clock: `realClock` when given, else `original()` (the patched
 * function's own original, which may throw why there is none).
 */
export function cannedData(destination: { spec: CannedSpec; realClock?: bigint }, original: () => bigint): Uint8Array {
  const data = new DataView(new ArrayBuffer(CANNED_DATA.size));
  const { spec } = destination;
  if (spec.kind === "clock" && (spec.function === "clock_gettime" || spec.rate === 1)) {
    data.setBigUint64(CANNED_DATA.original, destination.realClock ?? original(), true);
  }
  return new Uint8Array(data.buffer);
}

const INTEGER_BITS: Readonly<Partial<Record<NativeType, { bits: number; signed: boolean }>>> = {
  i8: { bits: 8, signed: true },
  u8: { bits: 8, signed: false },
  i16: { bits: 16, signed: true },
  u16: { bits: 16, signed: false },
  i32: { bits: 32, signed: true },
  u32: { bits: 32, signed: false },
  i64: { bits: 64, signed: true },
  isize: { bits: 64, signed: true },
  u64: { bits: 64, signed: false },
  usize: { bits: 64, signed: false },
  pointer: { bits: 64, signed: false },
  function: { bits: 64, signed: false },
  buffer: { bits: 64, signed: false },
};

/** `value` as the bits of a result of type `type`; refuses what does not fit it. */
export function cannedValue(type: NativeType, value: unknown, what: string): CannedValue {
  const refuse = (expected: string): never => {
    throw new RedefineError(
      "BAD_REPLACEMENT",
      `${what}: ${describe(value)} is not ${expected}, which a function returning ${type} needs.`,
    );
  };
  switch (type) {
    case "void":
      if (value !== undefined) refuse("undefined");
      return { register: "integer", bits: 0n };
    case "bool":
      if (typeof value !== "boolean") refuse("a boolean");
      return { register: "integer", bits: value ? 1n : 0n };
    case "f64":
      if (typeof value !== "number") refuse("a number");
      return { register: "f64", bits: new BigUint64Array(new Float64Array([value as number]).buffer)[0] };
    case "f32":
      if (typeof value !== "number") refuse("a number");
      return { register: "f32", bits: BigInt(new Uint32Array(new Float32Array([value as number]).buffer)[0]) };
  }
  const { bits, signed } = INTEGER_BITS[type]!;
  const range = signed ? `an integer from -2^${bits - 1} to 2^${bits - 1} - 1` : `an integer from 0 to 2^${bits} - 1`;
  const integer = typeof value === "bigint"
    ? value
    : typeof value === "number" && Number.isSafeInteger(value)
    ? BigInt(value)
    : refuse(range);
  const fits = signed ? BigInt.asIntN(bits, integer) === integer : BigInt.asUintN(bits, integer) === integer;
  if (!fits) refuse(range);
  // Signed results sign-extended to 64 bits, unsigned ones zero-extended: callers read either width.
  return { register: "integer", bits: BigInt.asUintN(64, integer) };
}

function describe(value: unknown): string {
  if (typeof value === "bigint") return `${value}n`;
  if (typeof value === "string") return JSON.stringify(value);
  return String(value);
}
