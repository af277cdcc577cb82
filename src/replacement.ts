/**
 * What runs instead: `destinationFor()` turns what the caller passed as the replacement (a JS
 * function, a native address, a symbol) into a `Destination`, the one thing the layout plans for.
 * Each kind of replacement is one member of the union: canned native code, carrying its own code
 * bytes and data block, joins it as one more.
 */
import { RedefineError } from "./errors.ts";
import type { JsFunction, JsValue, NativeType, Signature } from "./signature.ts";
import { cannedSpec, isCanned } from "./mock/canned.ts";
import type { Canned } from "./mock/canned.ts";
import type { CannedSpec } from "./arch/canned.ts";
import { machine } from "./registry.ts";
import { checkExecutable } from "./target.ts";
import type { NativeCallback } from "../platform/mod.ts";

/** A native replacement named by its symbol. */
export interface SymbolReplacement {
  /** The C name of the replacement function. */
  readonly symbol: string;
  /** The library exporting it; omitted: search the whole process. */
  readonly library?: string;
}

/**
 * What runs instead: a JS function of the target's signature, the address of a native function, a
 * native function named by its symbol, or canned native code (`returns()`, `sequence()`).
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
  /** A JS function, behind the runtime's callback: reached through the guard. */
  | { readonly kind: "callback"; readonly callback: NativeCallback }
  /** The function's own trampoline: it behaves as before, running relocated code. */
  | { readonly kind: "original" }
  /**
   * Canned native code (`returns()`, `sequence()`, a fake clock's function), placed with its data
   * block. `realClock`: the function a clock's code reads the real clock through, when not the
   * patched function's own original.
   */
  | { readonly kind: "canned"; readonly spec: CannedSpec; readonly realClock?: bigint };

/** The destination for `replacement`, a function of `signature`; refuses what cannot be one. */
export function destinationFor(signature: Signature, replacement: unknown): Destination {
  const m = machine();
  if (typeof replacement === "function") {
    if (replacement.length > signature.parameters.length) {
      throw new RedefineError(
        "BAD_REPLACEMENT",
        `the replacement takes ${replacement.length} parameters but the signature has ` +
          `${signature.parameters.length}: make them agree.`,
      );
    }
    const callback = m.platform.runtime.callback(nativeSignature(signature), replacement as never);
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
    checkExecutable(m, replacement, "the replacement address");
    return { kind: "native", address: replacement };
  }
  if (replacement && typeof replacement === "object" && typeof (replacement as SymbolReplacement).symbol === "string") {
    const { symbol, library } = replacement as SymbolReplacement;
    return { kind: "native", address: m.platform.os.symbolAddress(symbol, library) };
  }
  throw new RedefineError(
    "BAD_REPLACEMENT",
    `the replacement must be a JS function, a native address (bigint), { symbol, library? }, returns() ` +
      `or sequence(), not ${replacement === null ? "null" : typeof replacement}.`,
  );
}

/** Frees what a destination holds (a JS replacement's callback), for a patch that never went live. */
export function discard(destination: Destination): void {
  if (destination.kind === "callback") destination.callback.close();
}

/** Buffers reach native code as addresses, so a replacement sees a `bigint` for them. */
export function nativeSignature(signature: Signature): Signature {
  const pointerFor = (t: NativeType): NativeType => (t === "buffer" ? "pointer" : t);
  return { parameters: signature.parameters.map(pointerFor), result: pointerFor(signature.result) };
}
