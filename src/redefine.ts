/**
 * `redefine()`, the Patch handle and the registry of live patches.
 */
import { hex, hexBytes, RedefineError } from "./errors.ts";
import { checkSignature } from "./signature.ts";
import type { JsFunction, NativeType, Signature } from "./signature.ts";
import { CodePool, writeCode } from "./code_memory.ts";
import type { CodeSlot } from "./code_memory.ts";
import { archFor } from "./arch/mod.ts";
import type { Arch } from "./arch/mod.ts";
import { platform } from "../platform/mod.ts";
import type { NativeCallback, Platform, SymbolInfo } from "../platform/mod.ts";
import { PROT_EXEC } from "../platform/mod.ts";

/** A function to redefine, named by its symbol. */
export interface SymbolTarget<P extends readonly NativeType[], R extends NativeType> {
  /** The C name of the function, e.g. `"getpid"`. */
  readonly symbol: string;
  /** The library exporting it, e.g. `"libc.so.6"`; omitted: search the whole process. */
  readonly library?: string;
  /** The parameter types, in order. */
  readonly parameters: P;
  /** The result type. */
  readonly result: R;
  /** How many bytes from the entry may be overwritten; default: the symbol's size. */
  readonly size?: number;
}

/** A function to redefine, named by its entry address. */
export interface AddressTarget<P extends readonly NativeType[], R extends NativeType> {
  /** The function's entry. */
  readonly address: bigint;
  /**
   * How many bytes from the entry belong to the function and may be overwritten. Needed when no
   * symbol tells the function's extent.
   */
  readonly size?: number;
  /** The parameter types, in order. */
  readonly parameters: P;
  /** The result type. */
  readonly result: R;
}

/** What to redefine: a symbol or an address, with the function's signature. */
export type Target<P extends readonly NativeType[], R extends NativeType> =
  | SymbolTarget<P, R>
  | AddressTarget<P, R>;

/** A native replacement named by its symbol. */
export interface SymbolReplacement {
  /** The C name of the replacement function. */
  readonly symbol: string;
  /** The library exporting it; omitted: search the whole process. */
  readonly library?: string;
}

/**
 * What runs instead: a JS function of the target's signature, the address of a native function, or
 * a native function named by its symbol.
 */
export type Replacement<P extends readonly NativeType[], R extends NativeType> =
  | JsFunction<{ parameters: P; result: R }>
  | bigint
  | SymbolReplacement;

/** The live patches, oldest first. */
const live: Patch<readonly NativeType[], NativeType>[] = [];
let pool: CodePool | undefined;
let arch: Arch | undefined;

function machine(): { platform: Platform; pool: CodePool; arch: Arch } {
  const p = platform();
  pool ??= new CodePool(p);
  arch ??= archFor(p.runtime.arch);
  return { platform: p, pool, arch };
}

/** What a patch needs to undo itself. */
interface Applied {
  /** Where the entry jump is written (after a landing pad). */
  readonly at: bigint;
  readonly original: Uint8Array;
  readonly written: Uint8Array;
  readonly slots: CodeSlot[];
  readonly callback: NativeCallback | null;
}

/**
 * A live redefinition. `restore()` (or leaving a `using` scope) puts the original bytes and page
 * protections back exactly.
 *
 * @example
 * ```ts
 * import { redefine } from "./mod.ts";
 * const patch = redefine({ symbol: "getpid", parameters: [], result: "i32" }, () => 4242);
 * patch.active; // true
 * patch.restore();
 * patch.active; // false
 * ```
 */
export class Patch<P extends readonly NativeType[], R extends NativeType> {
  /** The function's entry (the symbol's address, even when the jump is written after `endbr64`). */
  readonly address: bigint;
  /** The signature the patch was made with. */
  readonly signature: { readonly parameters: P; readonly result: R };
  #applied: Applied | null;

  /** @internal Made by `redefine()`. */
  constructor(address: bigint, signature: { parameters: P; result: R }, applied: Applied) {
    this.address = address;
    this.signature = signature;
    this.#applied = applied;
  }

  /** True until the patch is restored. */
  get active(): boolean {
    return this.#applied !== null;
  }

  /** Where the entry jump is written: `address`, or just after a landing pad such as `endbr64`. */
  get patchedAddress(): bigint {
    return this.#applied?.at ?? this.address;
  }

  /**
   * Puts the original bytes and page protections back. Refuses (PATCH_MODIFIED) when the bytes at
   * the entry are no longer the ones this patch wrote. A second call does nothing.
   */
  restore(): void {
    const applied = this.#applied;
    if (!applied) return;
    const { platform, pool } = machine();
    const now = platform.runtime.view(applied.at, applied.written.length).slice();
    if (!now.every((b, i) => b === applied.written[i])) {
      throw new RedefineError(
        "PATCH_MODIFIED",
        `the entry of the function at ${hex(this.address)} changed after it was redefined (expected ` +
          `${hexBytes(applied.written)}, found ${hexBytes(now)}): something else patched it. Restore ` +
          `that patch first; redefine leaves these bytes alone rather than clobber them.`,
      );
    }
    writeCode(platform, [{ address: applied.at, bytes: applied.original }]);
    this.#applied = null;
    live.splice(live.indexOf(this as never), 1);
    for (const slot of applied.slots) pool.release(slot);
    // Only now that no entry leads to it can the callback go.
    applied.callback?.close();
  }

  /** Restores at the end of a `using` scope. */
  [Symbol.dispose](): void {
    this.restore();
  }
}

function resolveTarget(p: Platform, target: Target<readonly NativeType[], NativeType>): bigint {
  if ("symbol" in target && target.symbol !== undefined) {
    if (typeof target.symbol !== "string" || target.symbol === "") {
      throw new RedefineError("SYMBOL_NOT_FOUND", "'symbol' must be a non-empty string (a C name).");
    }
    return p.os.symbolAddress(target.symbol, target.library);
  }
  const address = (target as AddressTarget<readonly NativeType[], NativeType>).address;
  if (typeof address !== "bigint") {
    throw new RedefineError(
      "INVALID_ADDRESS",
      "the target needs a 'symbol' (string) or an 'address' (bigint, e.g. 0x7f00_1234_5678n).",
    );
  }
  return address;
}

function checkExecutable(p: Platform, address: bigint, what: string): void {
  if (address === 0n) {
    throw new RedefineError("INVALID_ADDRESS", `${what} is the NULL address: check where it came from.`);
  }
  const mapping = p.os.mappingAt(address);
  if (!mapping || !(mapping.protection & PROT_EXEC)) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `${what} ${hex(address)} is ${mapping ? "in a non-executable mapping" : "not mapped"}: it is not ` +
        `code. Check the address against the process's memory map, or name the function by its symbol.`,
    );
  }
}

/**
 * Symbols by address, as `dladdr1` found them: the lookup scans a library's whole symbol table, and
 * a loaded library's symbols do not move.
 */
const extents = new Map<bigint, SymbolInfo | null>();

/** How many bytes from `address` belong to the function: a given size, or its symbol's extent. */
function extentOf(p: Platform, address: bigint, size: number | undefined): number {
  if (size !== undefined) {
    if (!Number.isSafeInteger(size) || size <= 0) {
      throw new RedefineError("FUNCTION_TOO_SHORT", `'size' must be a positive integer, not ${size}.`);
    }
    return size;
  }
  let symbol = extents.get(address);
  if (symbol === undefined) extents.set(address, symbol = p.os.symbolAt(address));
  if (symbol && symbol.size > 0 && address >= symbol.start && address < symbol.start + BigInt(symbol.size)) {
    return Number(symbol.start + BigInt(symbol.size) - address);
  }
  throw new RedefineError(
    "UNKNOWN_SIZE",
    `no symbol tells how long the function at ${hex(address)} is` +
      `${symbol ? ` (nearest symbol: '${symbol.name}' at ${hex(symbol.start)})` : ""}, so redefine will ` +
      `not guess how many bytes it may overwrite. Pass { size } with the function's length in bytes.`,
  );
}

function resolveReplacement(
  p: Platform,
  signature: Signature,
  replacement: unknown,
): { address: bigint; callback: NativeCallback | null } {
  if (typeof replacement === "function") {
    if (replacement.length > signature.parameters.length) {
      throw new RedefineError(
        "BAD_REPLACEMENT",
        `the replacement takes ${replacement.length} parameters but the signature has ` +
          `${signature.parameters.length}: make them agree.`,
      );
    }
    const callback = p.runtime.callback(nativeSignature(signature), replacement as never);
    return { address: callback.address, callback };
  }
  if (typeof replacement === "bigint") {
    checkExecutable(p, replacement, "the replacement address");
    return { address: replacement, callback: null };
  }
  if (replacement && typeof replacement === "object" && typeof (replacement as SymbolReplacement).symbol === "string") {
    const { symbol, library } = replacement as SymbolReplacement;
    return { address: p.os.symbolAddress(symbol, library), callback: null };
  }
  throw new RedefineError(
    "BAD_REPLACEMENT",
    `the replacement must be a JS function, a native address (bigint) or { symbol, library? }, not ` +
      `${replacement === null ? "null" : typeof replacement}.`,
  );
}

/** Buffers reach native code as addresses, so a replacement sees a `bigint` for them. */
function nativeSignature(signature: Signature): Signature {
  const pointerFor = (t: NativeType): NativeType => (t === "buffer" ? "pointer" : t);
  return { parameters: signature.parameters.map(pointerFor), result: pointerFor(signature.result) };
}

/**
 * Redefines a native function: every caller of `target`, native code and the runtime included, runs
 * `replacement` instead until the patch is restored.
 *
 * @example
 * ```ts
 * import { redefine } from "./mod.ts";
 * const patch = redefine(
 *   { symbol: "getpid", library: "libc.so.6", parameters: [], result: "i32" },
 *   () => 4242,
 * );
 * try {
 *   // every native caller of getpid now gets 4242
 * } finally {
 *   patch.restore();
 * }
 * ```
 */
export function redefine<const P extends readonly NativeType[], const R extends NativeType>(
  target: Target<P, R>,
  replacement: Replacement<P, R>,
): Patch<P, R> {
  if (target === null || typeof target !== "object") {
    throw new RedefineError("INVALID_ADDRESS", "the target must be { symbol | address, parameters, result }.");
  }
  const signature = checkSignature(target, "the target's signature") as { parameters: P; result: R };
  const { platform: p, pool, arch } = machine();
  const address = resolveTarget(p, target);
  checkExecutable(p, address, "the function");
  if (pool.contains(address)) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `${hex(address)} is inside redefine's own stubs: redefine the original function instead.`,
    );
  }
  const extent = extentOf(p, address, target.size);
  const code = p.runtime.view(address, Math.min(extent, 64)).slice();
  const at = address + BigInt(arch.landingPadLength(code));
  const room = extent - Number(at - address);
  const clash = live.find((patch) => patch.patchedAddress === at || patch.address === address);
  if (clash) {
    throw new RedefineError(
      "ALREADY_PATCHED",
      `the function at ${hex(address)} is already redefined: restore that patch first.`,
    );
  }
  if (room < arch.nearJumpSize) {
    throw new RedefineError(
      "FUNCTION_TOO_SHORT",
      `the function at ${hex(address)} is ${extent} bytes long; the shortest jump needs ` +
        `${arch.nearJumpSize} after the ${extent - room}-byte landing pad. Redefine a caller instead.`,
    );
  }
  const { address: to, callback } = resolveReplacement(p, signature, replacement);
  const slots: CodeSlot[] = [];
  try {
    const entry = entryJump(pool, arch, at, to, room, slots);
    const original = code.slice(Number(at - address), Number(at - address) + entry.length);
    writeCode(p, [{ address: at, bytes: entry }]);
    const patch = new Patch(address, signature, { at, original, written: entry, slots, callback });
    live.push(patch as never);
    return patch;
  } catch (error) {
    for (const slot of slots) pool.release(slot);
    callback?.close();
    throw error;
  }
}

/**
 * The entry jump to `to`: a near jump straight there when it reaches, else a near jump to a stub
 * holding an absolute jump, else (no near memory) the absolute jump itself when the function has
 * room for it.
 */
function entryJump(pool: CodePool, arch: Arch, at: bigint, to: bigint, room: number, slots: CodeSlot[]): Uint8Array {
  const direct = arch.nearJump(at, to);
  if (direct) return direct;
  const stub = pool.allocate(at, arch.nearReach - 4096n, arch.farJumpSize);
  if (stub) {
    slots.push(stub);
    pool.write(stub, arch.farJump(stub.address, to));
    return arch.nearJump(at, stub.address)!;
  }
  if (room < arch.farJumpSize) {
    throw new RedefineError(
      "FUNCTION_TOO_SHORT",
      `no memory could be had within reach of ${hex(at)} for a stub, and the function has only ${room} ` +
        `bytes, fewer than the ${arch.farJumpSize} an absolute jump needs.`,
    );
  }
  return arch.farJump(at, to);
}

/**
 * Restores every live patch, newest first.
 *
 * @example
 * ```ts
 * import { redefine, restoreAll } from "./mod.ts";
 * redefine({ symbol: "getpid", parameters: [], result: "i32" }, () => 1);
 * restoreAll();
 * ```
 */
export function restoreAll(): void {
  for (const patch of [...live].reverse()) patch.restore();
}
