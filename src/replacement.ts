/**
 * What runs instead: `destinationFor()` turns what the caller passed as the replacement (a JS
 * function, a native address, a symbol) into a `Destination`, the one thing the layout plans for.
 * Each kind of replacement is one member of the union: canned native code, carrying its own code
 * bytes and data block, joins it as one more.
 */
import { hex, RedefineError } from "./errors.ts";
import type { JsFunction, JsValue, NativeType, Signature } from "./signature.ts";
import { cannedSpec, isCanned } from "./mock/canned.ts";
import type { Canned } from "./mock/canned.ts";
import type { CannedSpec } from "./arch/canned.ts";
import { codeHint, machine } from "./registry.ts";
import { checkExecutable, symbolAddress } from "./target.ts";
import type { NativeCall, NativeCallback } from "../platform/mod.ts";
import { PROT_EXEC } from "../platform/mod.ts";

/**
 * A native replacement named by its symbol.
 *
 * @example
 * ```ts
 * import { redefine } from "@redefine/redefine";
 * import type { SymbolReplacement } from "@redefine/redefine";
 * const getpid: SymbolReplacement = { symbol: "getpid", library: "libc.so.6" };
 * using patch = redefine({ symbol: "getppid", parameters: [], result: "i32" }, getpid);
 * ```
 */
export interface SymbolReplacement {
  /** The C name of the replacement function. */
  readonly symbol: string;
  /** The library exporting it; omitted: search the whole process. */
  readonly library?: string;
}

/**
 * What runs instead: a JS function of the target's signature, the address of a native function, a
 * native function named by its symbol, or canned native code (`returns()`, `sequence()`).
 *
 * @example
 * ```ts
 * import type { Replacement } from "@redefine/redefine";
 * const negate: Replacement<["i64"], "i64"> = (x) => -x;
 * const elsewhere: Replacement<["i64"], "i64"> = { symbol: "imaxabs" };
 * ```
 */
export type Replacement<P extends readonly NativeType[], R extends NativeType> =
  | JsFunction<{ parameters: P; result: R }>
  | bigint
  | SymbolReplacement
  | Canned<JsValue<R>>;

/** Where a patched function's callers are sent. */
export type Destination =
  /** A native function: the entry jump can lead straight there. */
  | { readonly kind: "native"; readonly address: bigint }
  /** The native probe (src/arch/probe.ts): counts every call, and times them when `timing`. */
  | { readonly kind: "probe"; readonly timing: boolean }
  /** A JS function, behind the runtime's callback: reached through the guard. */
  | { readonly kind: "callback"; readonly callback: NativeCallback }
  /** The function's own trampoline: it behaves as before, running relocated code. */
  | { readonly kind: "original" }
  /**
   * Canned native code (`returns()`, `sequence()`, a fake clock's function), placed with its data
   * block. `realClock`: the function a clock's code reads the real clock through, when not the
   * patched function's own original.
   */
  | { readonly kind: "canned"; readonly spec: CannedSpec; readonly realClock?: bigint | undefined };

/** The key of the replacement value that stands for the native probe (src/trace/native_probe.ts). */
export const NATIVE_PROBE: unique symbol = Symbol("redefine: native probe");

/** The destination for `replacement`, a function of `signature`; refuses what cannot be one. */
export function destinationFor(signature: Signature, replacement: unknown): Destination {
  const m = machine();
  const probe = (replacement as { [NATIVE_PROBE]?: { timing: boolean } } | null)?.[NATIVE_PROBE];
  if (probe) return { kind: "probe", timing: probe.timing };
  if (typeof replacement === "function") {
    refuseUncallable(replacement);
    if (replacement.length > signature.parameters.length) {
      throw new RedefineError(
        "BAD_REPLACEMENT",
        `the replacement takes ${replacement.length} parameters but the signature has ` +
          `${signature.parameters.length}: make them agree.`,
      );
    }
    const native = nativeSignature(signature);
    const run = checked(replacement as NativeCall, native.result, native.parameters.length);
    const callback = m.platform.runtime.callback(native, run);
    return { kind: "callback", callback };
  }
  if (isCanned(replacement)) {
    if (!m.arch.canned) {
      throw new RedefineError(
        "UNSUPPORTED_PLATFORM",
        `returns() and sequence() have no ${m.arch.name} code: use a native or a JS replacement.`,
      );
    }
    return { kind: "canned", spec: cannedSpec(replacement, signature.result) };
  }
  if (typeof replacement === "bigint") {
    checkExecutable(replacement, "the replacement address", codeHint);
    return { kind: "native", address: replacement };
  }
  if (replacement && typeof replacement === "object" && typeof (replacement as SymbolReplacement).symbol === "string") {
    const { symbol, library } = replacement as SymbolReplacement;
    const address = symbolAddress(m, symbol, library);
    const mapping = codeHint(address);
    if (!mapping || !(mapping.protection & PROT_EXEC)) {
      throw new RedefineError(
        "BAD_REPLACEMENT",
        `the replacement '${symbol}' at ${hex(address)} is data, not code: name a function, or pass a ` +
          `JS function.`,
      );
    }
    return { kind: "native", address };
  }
  throw new RedefineError(
    "BAD_REPLACEMENT",
    `the replacement must be a JS function, a native address (bigint), { symbol, library? }, returns() ` +
      `or sequence(), not ${replacement === null ? "null" : typeof replacement}.`,
  );
}

/**
 * Refuses functions that cannot answer a native call with a value: async functions (a promise),
 * generators (an iterator) and classes (which cannot be called without `new`).
 */
export function refuseUncallable(fn: object): void {
  // Bound functions keep their target's prototype, so a bound async function is caught too.
  const kind = Object.getPrototypeOf(fn)?.[Symbol.toStringTag];
  // Only a function with a fixed `prototype` may be a class (arrows and methods have none, plain
  // functions a writable one): its source, made afresh by `toString`, is read only for those, and
  // a descriptor is made only for a function that has one.
  const fixed = Object.hasOwn(fn, "prototype") && Object.getOwnPropertyDescriptor(fn, "prototype")?.writable === false;
  const isClass = fixed && Function.prototype.toString.call(fn).startsWith("class");
  if (kind === "AsyncFunction" || kind === "GeneratorFunction" || kind === "AsyncGeneratorFunction" || isClass) {
    throw new RedefineError(
      "BAD_REPLACEMENT",
      `the replacement is ${isClass ? "a class" : `an ${kind}`}, and a native caller needs its result ` +
        `synchronously: pass a plain function that returns a value (do async work elsewhere).`,
    );
  }
}

/** What kind of JS value a result type takes, named as `typeof` names it. */
type Kind = "void" | "boolean" | "bigint" | "number";

function kindOf(type: NativeType): Kind {
  switch (type) {
    case "void":
      return "void";
    case "bool":
      return "boolean";
    case "i64":
    case "u64":
    case "isize":
    case "usize":
    case "pointer":
    case "function":
    case "buffer":
      return "bigint";
    default:
      return "number";
  }
}

/**
 * The integer types narrower than 64 bits and their ranges. A number returned for one must be an
 * integer in its range: Deno and Bun would truncate and wrap any other, node:ffi abort on it. A
 * bigint for a 64-bit type is not checked: every runtime wraps it to 64 bits, and a range check
 * would cost the call through a JS replacement 4%.
 */
const NARROW: Partial<Record<NativeType, readonly [number, number]>> = {
  i8: [-(2 ** 7), 2 ** 7 - 1],
  u8: [0, 2 ** 8 - 1],
  i16: [-(2 ** 15), 2 ** 15 - 1],
  u16: [0, 2 ** 16 - 1],
  i32: [-(2 ** 31), 2 ** 31 - 1],
  u32: [0, 2 ** 32 - 1],
};

/** Whether a value of the result's kind is one `type` holds (made once per type: asked every JS replacement). */
function holder(type: NativeType): (value: number) => boolean {
  return HOLDERS.get(type) ?? ANY;
}

const ANY = (): boolean => true;
const HOLDERS: ReadonlyMap<NativeType, (value: number) => boolean> = new Map(
  Object.entries(NARROW).map(([type, [low, high]]) => [type as NativeType, (v: number) => v >= low && v <= high && Number.isInteger(v)]),
);

/** What a native caller gets from a replacement that failed: 0 of the result type. */
const ZERO: Readonly<Record<Kind, unknown>> = { void: undefined, boolean: false, bigint: 0n, number: 0 };

/** What a result of `type` must be, for a message (a void result is never refused). */
function expected(type: NativeType, kind: Kind): string {
  const range = NARROW[type];
  if (range) return `an integer number from ${range[0]} to ${range[1]}`;
  const kinds = { void: "anything", boolean: "a boolean", bigint: "a bigint (or an integer number up to 2^53)" };
  return kinds[kind as keyof typeof kinds] ?? "a number";
}

/**
 * `fn` as the runtime's callback must run it: an exception never reaches the runtime's callback
 * machinery (Deno drops it when a later call returns normally, Bun skips the rest of the native
 * call), and a result of the wrong kind never reaches the runtime's conversion (Deno panics on a
 * bigint for an `i32`; node:ffi aborts on a number out of range). The native caller gets 0
 * instead, and the error is thrown again as soon as the current synchronous JS has run, as an
 * uncaught error: the same on every runtime. A value the type holds is passed on as is; a safe
 * integer number becomes a bigint for a 64-bit type, where the runtimes would convert it differently.
 */
function checked(fn: NativeCall, type: NativeType, arity: number): NativeCall {
  const kind = kindOf(type);
  const zero = ZERO[kind];
  const holds = holder(type);
  // A value not of `kind`: nothing for a void function, a bigint for a safe integer, else refused.
  const settle = (value: unknown): unknown => {
    if (kind === "void") return undefined;
    if (kind === "bigint" && Number.isSafeInteger(value)) return BigInt(value as number);
    rethrowLater(
      new RedefineError(
        "BAD_REPLACEMENT",
        `the replacement returned ${describe(value)}, which ${type} cannot hold: return ` +
          `${expected(type, kind)} (its native caller got ${kind === "boolean" ? "false" : "0"}).`,
      ),
    );
    return zero;
  };
  const fail = (error: unknown): unknown => {
    rethrowLater(error);
    return zero;
  };
  // One wrapper per arity (forwarding `arguments` or a rest array costs a JS replacement's call
  // 6%), and a value of the right kind — a kind is named as `typeof` names it — goes straight on.
  // deno-lint-ignore no-explicit-any
  type A = any;
  switch (arity) {
    case 0:
      return () => {
        let v;
        try { v = fn(); } catch (e) { return fail(e); }
        return typeof v === kind && holds(v) ? v : settle(v);
      };
    case 1:
      return (a: A) => {
        let v;
        try { v = fn(a); } catch (e) { return fail(e); }
        return typeof v === kind && holds(v) ? v : settle(v);
      };
    case 2:
      return (a: A, b: A) => {
        let v;
        try { v = fn(a, b); } catch (e) { return fail(e); }
        return typeof v === kind && holds(v) ? v : settle(v);
      };
    case 3:
      return (a: A, b: A, c: A) => {
        let v;
        try { v = fn(a, b, c); } catch (e) { return fail(e); }
        return typeof v === kind && holds(v) ? v : settle(v);
      };
    case 4:
      return (a: A, b: A, c: A, d: A) => {
        let v;
        try { v = fn(a, b, c, d); } catch (e) { return fail(e); }
        return typeof v === kind && holds(v) ? v : settle(v);
      };
    default:
      return (...args: A[]) => {
        let v;
        try { v = fn(...args); } catch (e) { return fail(e); }
        return typeof v === kind && holds(v) ? v : settle(v);
      };
  }
}

/** Throws `error` once the current synchronous JS has run: an uncaught error, never lost. */
function rethrowLater(error: unknown): void {
  queueMicrotask(() => {
    throw error;
  });
}

/** A returned value, for a message. */
function describe(value: unknown): string {
  if (typeof value === "bigint") return `${value}n`;
  if (typeof value === "string") return JSON.stringify(value.length > 40 ? value.slice(0, 40) + "…" : value);
  return typeof value === "function" ? "a function" : String(value);
}

/** Where a native replacement is, for a transaction's commit to check (`CodeWrite.leadsTo`); else undefined. */
export function nativeAddress(to: Destination): bigint | undefined {
  return to.kind === "native" ? to.address : undefined;
}

/** Frees what a destination holds (a JS replacement's callback), for a patch that never went live. */
export function discard(destination: Destination): void {
  if (destination.kind === "callback") destination.callback.close();
}

/** Buffers reach native code as addresses, so a replacement sees a `bigint` for them. */
export function nativeSignature(signature: Signature): Signature {
  // Most signatures have no buffer: those are their own, with nothing made.
  if (signature.result !== "buffer" && !signature.parameters.includes("buffer")) return signature;
  const pointerFor = (t: NativeType): NativeType => (t === "buffer" ? "pointer" : t);
  return { parameters: signature.parameters.map(pointerFor), result: pointerFor(signature.result) };
}
