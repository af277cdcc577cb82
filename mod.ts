/**
 * Redefine native functions at run time from Deno, Bun and Node 26, through nothing but the
 * runtime's own FFI. A patch overwrites the first bytes of a function with a jump to your
 * replacement — a JS function or another native function — so every caller, the runtime
 * included, runs the replacement until the patch is restored, byte for byte.
 *
 * @example
 * ```ts
 * import { redefine } from "@redefine/redefine";
 *
 * using patch = redefine(
 *   { symbol: "getpid", library: "libc.so.6", parameters: [], result: "i32" },
 *   () => 4242,
 * );
 * // every native caller of getpid now gets 4242, until the end of this scope
 * ```
 *
 * @module
 */
export { redefine, redefineAll, restoreAll } from "./src/redefine.ts";
export { transaction } from "./src/transaction.ts";
export { wrap } from "./src/wrap.ts";
export { Patch } from "./src/patch.ts";
export type { AddressTarget, SymbolTarget, Target } from "./src/target.ts";
export type { Replacement, SymbolReplacement } from "./src/replacement.ts";
export { attach, Probe } from "./src/trace/attach.ts";
export type { ProbeArguments, ProbeCallbacks } from "./src/trace/attach.ts";
export { RedefineError } from "./src/errors.ts";
export type { RedefineErrorCode } from "./src/errors.ts";
export type { JsArguments, JsFunction, JsParameters, JsValue, NativeType, Signature } from "./src/signature.ts";
export { returns, sequence } from "./src/mock/canned.ts";
export type { Canned } from "./src/mock/canned.ts";
export { FakeClock, fakeClock } from "./src/mock/clock.ts";
export type { FakeClockOptions } from "./src/mock/clock.ts";
export { exports, find, imports, modules, symbolAt } from "./src/introspect.ts";
export type { Definition, LoadedModule, ModuleExport, ModuleImport, SymbolLocation } from "./src/introspect.ts";
