/**
 * `redefine()`, the Patch handle and the registry of live patches.
 */
import { hex, hexBytes, RedefineError } from "./errors.ts";
import { checkSignature } from "./signature.ts";
import type { JsArguments, JsFunction, JsValue, NativeType, Signature } from "./signature.ts";
import { CodePool, writeCode } from "./code_memory.ts";
import type { CodeSlot, CodeWrite } from "./code_memory.ts";
import { archFor } from "./arch/mod.ts";
import type { Arch, RelocationPlan } from "./arch/types.ts";
import { OriginalStubs } from "./original.ts";
import type { OriginalStub } from "./original.ts";
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

type AnyPatch = Patch<readonly NativeType[], NativeType>;

/** The live patches, oldest first. */
const live: AnyPatch[] = [];
/** The newest live patch of each function, by its entry. */
const newest = new Map<bigint, AnyPatch>();
/** Live patches by the 64-byte block their entry jump starts in, to find neighbours quickly. */
const byBlock = new Map<bigint, AnyPatch[]>();
const BLOCK = 64n;
/** No entry jump is longer than this (x86-64's 14 bytes, arm64's 16). */
const LONGEST_JUMP = 16n;

function index(patch: AnyPatch): void {
  live.push(patch);
  newest.set(patch.address, patch);
  const block = patch.patchedAddress / BLOCK;
  byBlock.set(block, [...(byBlock.get(block) ?? []), patch]);
}

function unindex(patch: AnyPatch, under: AnyPatch | null): void {
  live.splice(live.lastIndexOf(patch), 1);
  if (under) newest.set(patch.address, under);
  else newest.delete(patch.address);
  const block = patch.patchedAddress / BLOCK;
  const rest = byBlock.get(block)!.filter((p) => p !== patch);
  if (rest.length) byBlock.set(block, rest);
  else byBlock.delete(block);
}

/** Live patches whose entry jump may touch [from, to). */
function patchesNear(from: bigint, to: bigint): AnyPatch[] {
  const found: AnyPatch[] = [];
  for (let block = (from - LONGEST_JUMP) / BLOCK; block <= (to - 1n) / BLOCK; block++) {
    found.push(...(byBlock.get(block) ?? []));
  }
  return found;
}

interface Machine {
  readonly platform: Platform;
  readonly pool: CodePool;
  readonly arch: Arch;
  readonly originals: OriginalStubs;
  /** The JS thread's identity as the guard stub reads it; computed on first use. */
  jsThread?: bigint;
  /** Code shared by many patches, by its bytes: where each copy was placed. */
  readonly shared: Map<string, bigint[]>;
}

let current: Machine | undefined;

function machine(): Machine {
  if (current) return current;
  const p = platform();
  const arch = archFor(p.runtime.arch);
  current = { platform: p, pool: new CodePool(p), arch, originals: new OriginalStubs(p, arch), shared: new Map() };
  restoreAtExit();
  return current;
}

/**
 * Puts every function back when the process exits normally (Deno's `unload` event, Bun's
 * `process.on("exit")`): native code that runs later — other threads, atexit handlers — must not
 * jump into callbacks the runtime is tearing down. Each patch alone: one that refuses does not
 * keep the others in place.
 */
function restoreAtExit(): void {
  const restoreEach = () => {
    for (const patch of [...live].reverse()) {
      try {
        patch.restore();
      } catch {
        // Someone else rewrote its entry (PATCH_MODIFIED): leave their bytes be.
      }
    }
  };
  const global = globalThis as {
    Deno?: unknown;
    addEventListener?: (type: string, listener: () => void) => void;
    process?: { on(event: string, listener: () => void): void };
  };
  if (global.Deno !== undefined) global.addEventListener?.("unload", restoreEach);
  else global.process?.on("exit", restoreEach);
}

/**
 * A copy of `code` (code shared by many patches, such as the calling guard) within near-jump
 * reach of `near`: placed once per region and reused.
 */
function sharedCode(m: Machine, code: Uint8Array, near: bigint): bigint {
  const key = code.join();
  const reach = m.arch.nearReach - BigInt(code.length) - 4096n;
  const copies = m.shared.get(key) ?? [];
  const found = copies.find((at) => (at > near ? at - near : near - at) < reach);
  if (found !== undefined) return found;
  const slot = m.pool.allocate(near, reach, code.length);
  if (!slot) throw new RedefineError("ALLOCATION_FAILED", `no executable memory near ${hex(near)} for the guard.`);
  m.pool.write(slot, code);
  m.shared.set(key, [...copies, slot.address]);
  return slot.address;
}

/** The JS thread's thread pointer, read by running the guard's own read on this thread. */
function jsThreadOf(m: Machine, reader: Uint8Array): bigint {
  if (m.jsThread !== undefined) return m.jsThread;
  const slot = m.pool.allocate(0n, 2n ** 62n, reader.length);
  if (!slot) throw new RedefineError("ALLOCATION_FAILED", "no executable memory for the thread probe.");
  m.pool.write(slot, reader);
  m.jsThread = m.platform.runtime.fnPointer(slot.address, { parameters: [], result: "u64" })() as bigint;
  return m.jsThread;
}

/** What a patch needs to undo itself. */
interface Applied {
  /** Where the entry jump is written (after a landing pad). */
  readonly at: bigint;
  /** What was at `at` before: the function's bytes, or the entry jump of the patch below. */
  readonly original: Uint8Array;
  readonly written: Uint8Array;
  /** Where the entry jump leads (a stub, the guard, or the replacement itself). */
  readonly destination: bigint;
  /** Trampoline, then stub or guard: null when the jump reaches the replacement directly. */
  readonly slot: CodeSlot | null;
  /**
   * The relocated prologue (or the patch below's destination), or why there is none, or how to
   * make it when first asked for (a native replacement the entry jump reaches directly).
   */
  trampoline: bigint | RedefineError | LazyTrampoline;
  /** The slot of a trampoline made on demand. */
  lateSlot: CodeSlot | null;
  readonly callback: NativeCallback | null;
  /** The guard's busy flag (JS replacements): set while the replacement runs. */
  readonly busy: bigint | null;
  /** The patch this one is layered on, if the function was already redefined. */
  readonly under: Patch<readonly NativeType[], NativeType> | null;
}

/** Writes collected by `transaction()`, applied together when its body returns. */
interface Batch {
  readonly writes: CodeWrite[];
  readonly commits: (() => void)[];
  readonly rollbacks: (() => void)[];
}

let batch: Batch | null = null;

/** Writes now, or as part of the enclosing transaction. */
function schedule(p: Platform, write: CodeWrite, commit: () => void, rollback: () => void): void {
  if (batch) {
    batch.writes.push(write);
    batch.commits.push(commit);
    batch.rollbacks.push(rollback);
    return;
  }
  try {
    writeCode(p, [write]);
  } catch (error) {
    rollback();
    throw error;
  }
  commit();
}

/**
 * A live redefinition. `restore()` (or leaving a `using` scope) puts the original bytes and page
 * protections back exactly; `original(...)` calls the function as it was.
 *
 * @example
 * ```ts
 * import { redefine } from "./mod.ts";
 * const patch = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => -x);
 * patch.active; // true
 * patch.original(-5n); // 5n: the real labs, through the trampoline
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
  #original: OriginalStub | undefined;
  /** A newer patch layered on this one: it must be restored first. */
  #over: Patch<readonly NativeType[], NativeType> | null = null;
  /** Set while a restore waits for its transaction to commit. */
  #restoring = false;

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
   * The original function as a native address, for a native replacement to call: the trampoline
   * (the relocated first instructions and a jump back into the function) while the patch is live
   * — or, for a patch layered on another, the replacement below it — and the function itself once
   * restored. Throws `UNRELOCATABLE` when the first instructions could not be moved.
   */
  get originalAddress(): bigint {
    const applied = this.#applied;
    if (!applied) return this.address;
    if (typeof applied.trampoline === "function") {
      try {
        const made = applied.trampoline();
        applied.lateSlot = made.slot;
        applied.trampoline = made.address;
      } catch (error) {
        if (!(error instanceof RedefineError)) throw error;
        applied.trampoline = error;
      }
    }
    if (applied.trampoline instanceof RedefineError) throw applied.trampoline;
    return applied.trampoline;
  }

  /**
   * Calls the original function, with the signature's JS types, at the runtime's full FFI speed.
   * Works while the patch is live (through the trampoline) and after it is restored (the function
   * itself). Throws `UNRELOCATABLE` when the first instructions could not be moved.
   */
  get original(): (...args: JsArguments<P>) => JsValue<R> {
    if (!this.#original) {
      const address = this.originalAddress;
      const signature = nativeSignature(this.signature);
      const key = `${this.address}:${this.depth}:${signature.parameters.join()}:${signature.result}`;
      this.#original = machine().originals.acquire(key, signature, address);
    }
    return this.#original.call;
  }

  /** How many live patches this one is layered on. */
  get depth(): number {
    let depth = 0;
    for (let under = this.#applied?.under; under; under = under.#applied?.under) depth++;
    return depth;
  }

  /**
   * Puts the original bytes and page protections back (for a layered patch: the patch below it).
   * Refuses with PATCH_MODIFIED when the bytes at the entry are no longer the ones this patch
   * wrote, and with OUT_OF_ORDER while a newer patch is layered on this one. A second call does
   * nothing. Inside `transaction()`, takes effect when the transaction commits.
   */
  restore(): void {
    const applied = this.#applied;
    if (!applied || this.#restoring) return;
    const over = this.#over;
    if (over && !over.#restoring) {
      throw new RedefineError(
        "OUT_OF_ORDER",
        `the function at ${hex(this.address)} was redefined again on top of this patch: restore the ` +
          `newer patch first (restoreAll() goes newest first).`,
      );
    }
    const { platform, pool, arch } = machine();
    // Under a patch whose restore is pending in this transaction, the entry will hold our jump
    // again once that write lands; that patch has checked the bytes.
    const now = over ? applied.written : platform.runtime.view(applied.at, applied.written.length).slice();
    if (!now.every((b, i) => b === applied.written[i])) {
      throw new RedefineError(
        "PATCH_MODIFIED",
        `the entry of the function at ${hex(this.address)} changed after it was redefined (expected ` +
          `${hexBytes(applied.written)}, found ${hexBytes(now)}): something else patched it. Restore ` +
          `that patch first; redefine leaves these bytes alone rather than clobber them.`,
      );
    }
    this.#restoring = true;
    schedule(
      platform,
      { address: applied.at, bytes: applied.original, spin: arch.selfLoop },
      () => {
        this.#restoring = false;
        unindex(this as never, applied.under);
        this.#applied = null;
        if (applied.under) applied.under.#over = null;
        this.#original?.point(this.address);
        if (applied.slot) pool.release(applied.slot, applied.busy);
        if (applied.lateSlot) pool.release(applied.lateSlot, null);
        closeWhenIdle(platform, applied);
      },
      () => (this.#restoring = false),
    );
  }

  /** @internal Registers a freshly built patch; `abandon` undoes it if its write fails. */
  static register(patch: Patch<readonly NativeType[], NativeType>): void {
    index(patch);
    const under = patch.#applied!.under;
    if (under) under.#over = patch;
  }

  /** @internal Undoes `register` for a patch whose entry was never written. */
  static abandon(patch: Patch<readonly NativeType[], NativeType>): void {
    const applied = patch.#applied!;
    unindex(patch, applied.under);
    patch.#applied = null;
    if (applied.under) applied.under.#over = null;
    if (applied.slot) machine().pool.release(applied.slot, null);
    if (applied.lateSlot) machine().pool.release(applied.lateSlot, null);
    applied.callback?.close();
  }

  /** @internal Where this patch's entry jump leads. */
  get destination(): bigint | undefined {
    return this.#applied?.destination;
  }

  /** @internal The bytes this patch wrote at its entry. */
  get written(): Uint8Array | undefined {
    return this.#applied?.written;
  }

  /** @internal Copies the function's own bytes under this patch into `bytes` (starting at `start`). */
  overlayOriginal(bytes: Uint8Array, start: bigint): void {
    const applied = this.#applied;
    if (!applied || applied.under) return; // a layered patch's `original` is the jump below
    const offset = Number(applied.at - start);
    applied.original.forEach((b, i) => {
      if (offset + i >= 0 && offset + i < bytes.length) bytes[offset + i] = b;
    });
  }

  /** Restores at the end of a `using` scope. */
  [Symbol.dispose](): void {
    this.restore();
  }
}

/**
 * Closes a restored patch's callback. Restored from inside the replacement, the callback is still
 * running: it closes once the replacement has returned (the guard's busy flag says when).
 */
function closeWhenIdle(platform: Platform, applied: Applied): void {
  const callback = applied.callback;
  if (!callback) return;
  if (applied.busy !== null && platform.runtime.view(applied.busy, 1)[0] !== 0) {
    setTimeout(() => callback.close(), 0);
  } else {
    callback.close();
  }
}

/**
 * Applies everything `body` redefines and restores as one transaction: each page is made writable
 * once and gets its protection back once, however many patches it holds, and if anything fails —
 * in `body` or while writing — every page and byte is as it was before and the error is rethrown.
 * Patches made in `body` become active when it returns. Nested transactions join the outer one.
 *
 * @example
 * ```ts
 * import { redefine, restoreAll, transaction } from "./mod.ts";
 * const [a, b] = transaction(() => [
 *   redefine({ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" }),
 *   redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => x),
 * ]);
 * transaction(() => restoreAll());
 * ```
 */
export function transaction<T>(body: () => T): T {
  if (batch) return body();
  const current: Batch = { writes: [], commits: [], rollbacks: [] };
  batch = current;
  let result: T;
  try {
    result = body();
    batch = null;
    writeCode(machine().platform, current.writes);
  } catch (error) {
    batch = null;
    for (const rollback of current.rollbacks.reverse()) rollback();
    throw error;
  }
  for (const commit of current.commits) commit();
  return result;
}

/**
 * Redefines many functions at once, all or nothing: `transaction()` around one `redefine()` each.
 *
 * @example
 * ```ts
 * import { redefineAll, restoreAll } from "./mod.ts";
 * const patches = redefineAll([
 *   [{ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" }],
 *   [{ symbol: "labs", parameters: ["i64"], result: "i64" }, (x: bigint) => x],
 * ]);
 * restoreAll();
 * ```
 */
export function redefineAll(
  entries: readonly (readonly [Target<readonly NativeType[], NativeType>, Replacement<readonly NativeType[], NativeType>])[],
): Patch<readonly NativeType[], NativeType>[] {
  return transaction(() => entries.map(([target, replacement]) => redefine(target, replacement)));
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
function symbolAt(p: Platform, address: bigint): SymbolInfo | null {
  let symbol = extents.get(address);
  if (symbol === undefined) extents.set(address, symbol = p.os.symbolAt(address));
  return symbol;
}

/** Refuses an address that a symbol's code, decoded from its start, shows to be mid-instruction. */
function checkInstructionStart(p: Platform, arch: Arch, address: bigint): void {
  const symbol = symbolAt(p, address);
  if (!symbol || symbol.size === 0 || address <= symbol.start || address >= symbol.start + BigInt(symbol.size)) return;
  const offset = Number(address - symbol.start);
  const code = p.runtime.view(symbol.start, Math.min(symbol.size, offset + 16)).slice();
  if (arch.startsInstruction(code, symbol.start, offset) === false) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `${hex(address)} is inside an instruction of '${symbol.name}' (at +${offset}): a jump written ` +
        `there would corrupt it. Use the function's entry, ${hex(symbol.start)}.`,
    );
  }
}

function extentOf(p: Platform, address: bigint, size: number | undefined, arch: Arch, bySymbol: boolean): number {
  checkInstructionStart(p, arch, address);
  if (size !== undefined) {
    if (!Number.isSafeInteger(size) || size <= 0) {
      throw new RedefineError("FUNCTION_TOO_SHORT", `'size' must be a positive integer, not ${size}.`);
    }
    return size;
  }
  const symbol = symbolAt(p, address);
  if (symbol && symbol.size > 0 && address >= symbol.start && address < symbol.start + BigInt(symbol.size)) {
    return Number(symbol.start + BigInt(symbol.size) - address);
  }
  if (bySymbol) {
    // An exported name with no symbol size of its own (glibc's ifunc-selected strlen, say): its
    // entry surely is a function's, and the straight run of code from there surely is its body.
    const straight = arch.straightLineLength(p.runtime.view(address, 64).slice(), address);
    if (straight > 0) return straight;
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
  replacement: NoInfer<Replacement<P, R>>,
): Patch<P, R> {
  return apply(target, (p, signature) => resolveReplacement(p, signature, replacement));
}

/** Executable bytes the live patches hold in the code pool (for the memory-per-patch measure). */
export function codeBytesInUse(): number {
  return machine().pool.codeBytesInUse;
}

/** In place of a replacement: the function's own trampoline (see `redefineToOriginal`). */
const ORIGINAL = Symbol("original");

/**
 * Redirects a function to its own trampoline: every call then runs the relocated first
 * instructions and jumps back, behaving exactly as before. Not public: it exists to test the
 * relocator on live code (every caller in the process runs relocated code).
 */
export function redefineToOriginal<const P extends readonly NativeType[], const R extends NativeType>(
  target: Target<P, R>,
): Patch<P, R> {
  return apply(target, () => ({ address: ORIGINAL, callback: null }));
}

function apply<const P extends readonly NativeType[], const R extends NativeType>(
  target: Target<P, R>,
  resolve: (p: Platform, signature: Signature) => { address: bigint | typeof ORIGINAL; callback: NativeCallback | null },
): Patch<P, R> {
  if (target === null || typeof target !== "object") {
    throw new RedefineError("INVALID_ADDRESS", "the target must be { symbol | address, parameters, result }.");
  }
  const signature = checkSignature(target, "the target's signature") as { parameters: P; result: R };
  const m = machine();
  const { platform: p, pool, arch } = m;
  const address = resolveTarget(p, target);
  checkExecutable(p, address, "the function");
  if (pool.contains(address)) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `${hex(address)} is inside redefine's own stubs: redefine the original function instead.`,
    );
  }
  const extent = extentOf(p, address, target.size, arch, "symbol" in target && target.symbol !== undefined);
  // The whole function, so the relocator can see branches back into the bytes it overwrites.
  const code = p.runtime.view(address, Math.min(extent, MAX_SCAN)).slice();
  const pad = arch.landingPadLength(code);
  const at = address + BigInt(pad);
  const room = extent - pad;
  // Redefining a redefined function layers the new patch on top of the newest one.
  const under = newest.get(address) ?? null;
  if (room < arch.nearJumpSize) {
    throw new RedefineError(
      "FUNCTION_TOO_SHORT",
      `the function at ${hex(address)} is ${extent} bytes long; the shortest jump needs ` +
        `${arch.nearJumpSize} after the ${pad}-byte landing pad. Redefine a caller instead.`,
    );
  }
  // Before anything is decoded there: the bytes may be the middle of another patch's jump.
  refuseOverlap(at, arch.nearJumpSize);
  const { address: to, callback } = resolve(p, signature);
  let built: Built | undefined;
  try {
    built = build(m, code.subarray(pad, pad + room), at, room, to, callback, signature, under?.destination ?? null);
    refuseOverlap(at, built.covers);
    refuseBranchesInto(m, at, built.entry.length);
  } catch (error) {
    if (built?.slot) m.pool.release(built.slot, null);
    callback?.close();
    throw error;
  }
  // What the entry holds once every earlier write has landed: the function's bytes, under the
  // jump of the patch below if there is one.
  const original = code.slice(pad, pad + built.entry.length);
  if (under) original.set(under.written!.subarray(0, original.length));
  const patch = new Patch(address, signature, {
    at,
    original,
    written: built.entry,
    destination: built.destination,
    slot: built.slot,
    trampoline: built.trampoline,
    lateSlot: null,
    callback,
    busy: built.busy,
    under,
  });
  Patch.register(patch as never);
  schedule(p, { address: at, bytes: built.entry, spin: arch.selfLoop }, () => {}, () => Patch.abandon(patch as never));
  return patch;
}

/** How far into a function the relocator looks for branches back into its first bytes. */
const MAX_SCAN = 4096;
/**
 * Refuses to write or relocate bytes that hold another function's live entry jump (aliases and
 * internal entry points sit inside other functions): restoring one would leave the other with a
 * copy of a jump into freed memory.
 */
function refuseOverlap(at: bigint, covers: number): void {
  // Patches of the same function write at the same place: those are layers, not overlaps.
  const overlap = patchesNear(at, at + BigInt(covers)).find((patch) =>
    patch.patchedAddress !== at && patch.patchedAddress < at + BigInt(covers) &&
    at < patch.patchedAddress + BigInt(patch.written!.length)
  );
  if (overlap) {
    throw new RedefineError(
      "ALREADY_PATCHED",
      `the first ${covers} bytes at ${hex(at)} overlap the entry jump of the function redefined at ` +
        `${hex(overlap.address)}: restore that patch first.`,
    );
  }
}

/** Entries found clean by `refuseBranchesInto`, with how many of their bytes. */
const cleanEntries = new Map<bigint, number>();
/** How far before a function to look for code jumping into its first bytes. */
const SCAN_BEFORE = 2048;

/**
 * Refuses to overwrite bytes that nearby code jumps into: hand-written routines share code by
 * jumping past each other's first instruction (glibc's `mempcpy` jumps to `memmove` + 3).
 */
function refuseBranchesInto(m: Machine, at: bigint, length: number): void {
  // Code does not change under us (our own patches are read through), so a clean scan stays clean.
  if ((cleanEntries.get(at) ?? 0) >= length) return;
  const mapping = m.platform.os.mappingAt(at);
  const start = mapping && mapping.start > at - BigInt(SCAN_BEFORE) ? mapping.start : at - BigInt(SCAN_BEFORE);
  const before = m.platform.runtime.view(start, Number(at - start)).slice();
  // Read through our own live patches: their jumps would throw the decoder off the original code.
  for (const patch of patchesNear(start, at)) patch.overlayOriginal(before, start);
  const found = m.arch.branchesInto(before, start, at, at + BigInt(length));
  if (found.length) {
    throw new RedefineError(
      "UNRELOCATABLE",
      `code at ${found.map(hex).join(", ")} jumps into the first ${length} bytes of the function at ` +
        `${hex(at)}, which the entry jump would overwrite: redefining it would break that code. ` +
        `Redefine the function that jumps there, or a caller.`,
    );
  }
  cleanEntries.set(at, length);
}

/** Builds a trampoline on demand: its address and the slot holding it. */
type LazyTrampoline = () => { address: bigint; slot: CodeSlot };

interface Built {
  readonly entry: Uint8Array;
  /** Bytes from the entry that the jump overwrites or the trampoline copies. */
  readonly covers: number;
  /** Where the entry jump leads. */
  readonly destination: bigint;
  readonly slot: CodeSlot | null;
  readonly trampoline: bigint | RedefineError | LazyTrampoline;
  readonly busy: bigint | null;
}

/**
 * Lays out and writes a patch's code: in one pool slot near the entry, the trampoline (the
 * relocated first instructions, so the original stays callable), then the guard (JS replacements)
 * or an absolute jump to the replacement (when the entry's near jump cannot reach it). A patch
 * layered on another (`below`: where the other's entry jump leads) needs no trampoline: its
 * original is `below`. Returns the entry jump to write; nothing is written at the entry here.
 */
function build(
  m: Machine,
  body: Uint8Array,
  at: bigint,
  room: number,
  to: bigint | typeof ORIGINAL,
  callback: NativeCallback | null,
  signature: Signature,
  below: bigint | null,
): Built {
  const { arch, pool, platform: p } = m;
  const guard = callback ? arch.guard : undefined;
  const guardLayout = guard?.layout(p.runtime.os, signature);
  const layout = (jumpSize: number) => {
    let plan: RelocationPlan | RedefineError | null = null;
    if (below === null) {
      try {
        plan = arch.planRelocation(body, at, jumpSize);
      } catch (error) {
        if (!(error instanceof RedefineError)) throw error;
        plan = error;
      }
    }
    const trampolineSize = plan === null || plan instanceof RedefineError ? 0 : roundUp(plan.maxSize, 16);
    return { plan, trampolineSize, size: trampolineSize + (guardLayout ? guardLayout.size : arch.farJumpSize) };
  };
  let jumpSize = arch.nearJumpSize;
  const direct = !guard && to !== ORIGINAL ? arch.nearJump(at, to) : null;
  if (direct) {
    // Nothing to place now: the jump reaches the replacement. The original is the patch below, or
    // is relocated when first asked for (most native redirects never are).
    const trampoline = below ?? (() => {
      const plan = arch.planRelocation(body, at, jumpSize);
      refuseOverlap(at, plan.consumed);
      const slot = pool.allocate(at, arch.nearReach - BigInt(plan.maxSize), plan.maxSize);
      if (!slot) throw new RedefineError("ALLOCATION_FAILED", `no executable memory near ${hex(at)} for the original.`);
      try {
        pool.write(slot, arch.relocate(plan, slot.address));
      } catch (error) {
        pool.release(slot, null);
        throw error;
      }
      return { address: slot.address, slot };
    });
    return { entry: direct, covers: direct.length, destination: to as bigint, slot: null, trampoline, busy: null };
  }
  let shape = layout(jumpSize);
  const dataSize = guardLayout?.dataSize ?? 0;
  let slot = pool.allocate(at, arch.nearReach - BigInt(shape.size), shape.size, dataSize);
  if (!slot) {
    // No memory within reach of a near jump: the absolute jump goes at the entry itself.
    if (room < arch.farJumpSize) {
      throw new RedefineError(
        "FUNCTION_TOO_SHORT",
        `no memory could be had within reach of ${hex(at)} for a stub, and the function has only ` +
          `${room} bytes, fewer than the ${arch.farJumpSize} an absolute jump needs.`,
      );
    }
    jumpSize = arch.farJumpSize;
    shape = layout(jumpSize);
    slot = pool.allocate(at, 2n ** 62n, shape.size, dataSize);
    if (!slot) throw new RedefineError("ALLOCATION_FAILED", "no executable memory could be mapped for a stub.");
  }
  try {
    let trampoline: bigint | RedefineError = below ?? (shape.plan instanceof RedefineError ? shape.plan : slot.address);
    let relocated: Uint8Array = new Uint8Array(0);
    if (shape.plan !== null && !(shape.plan instanceof RedefineError)) {
      try {
        relocated = arch.relocate(shape.plan, slot.address);
      } catch (error) {
        if (!(error instanceof RedefineError)) throw error;
        trampoline = error;
      }
    }
    if (to === ORIGINAL && trampoline instanceof RedefineError) throw trampoline;
    if (guard && trampoline instanceof RedefineError) {
      throw new RedefineError(
        trampoline.code,
        `${trampoline.message} A JS replacement needs the original for calls from other threads; ` +
          `use a native replacement for this function.`,
        { cause: trampoline },
      );
    }
    const front = slot.address + BigInt(shape.trampolineSize);
    const dest = to === ORIGINAL ? trampoline as bigint : to;
    const straight = !guard && jumpSize === arch.nearJumpSize ? arch.nearJump(at, dest) : null;
    let frontCode: Uint8Array;
    if (guard && guardLayout) {
      const { code, data } = guard.encode({
        at: front,
        data: slot.data,
        jsThread: jsThreadOf(m, guard.threadPointerReader(p.runtime.os)),
        callback: dest,
        original: trampoline as bigint,
        os: p.runtime.os,
        signature,
        shared: guardLayout.shared ? sharedCode(m, guardLayout.shared, front) : undefined,
      });
      p.runtime.view(slot.data, data.length).set(data);
      frontCode = code;
    } else {
      frontCode = straight ? new Uint8Array(0) : arch.farJump(front, dest);
    }
    const bytes = new Uint8Array(shape.trampolineSize + frontCode.length);
    bytes.set(relocated, 0);
    bytes.set(frontCode, shape.trampolineSize);
    if (bytes.length) pool.write(slot, bytes);
    const destination = straight ? dest : front;
    const entry = straight ??
      (jumpSize === arch.nearJumpSize ? arch.nearJump(at, front)! : arch.farJump(at, front));
    return {
      entry,
      covers: coverage(entry, shape.plan),
      destination,
      slot,
      trampoline,
      busy: guardLayout ? slot.data + BigInt(guardLayout.busyOffset) : null,
    };
  } catch (error) {
    pool.release(slot, null);
    throw error;
  }
}

function coverage(entry: Uint8Array, plan: RelocationPlan | RedefineError | null): number {
  return plan && !(plan instanceof RedefineError) ? Math.max(entry.length, plan.consumed) : entry.length;
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/**
 * Restores every live patch, newest first, as one transaction: all of them or (when one refuses,
 * e.g. PATCH_MODIFIED) none.
 *
 * @example
 * ```ts
 * import { redefine, restoreAll } from "./mod.ts";
 * redefine({ symbol: "getpid", parameters: [], result: "i32" }, () => 1);
 * restoreAll();
 * ```
 */
export function restoreAll(): void {
  transaction(() => {
    for (const patch of [...live].reverse()) patch.restore();
  });
}
