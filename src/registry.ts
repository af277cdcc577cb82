/**
 * What redefine keeps for the whole process: the machine it runs on (platform, arch, code pool,
 * original stubs, and what it has learnt about the code), and the registry of live patches — which
 * functions are patched, how patches of one function stack, whose entry jumps a new one would
 * overlap — put back when the process exits. The one home of module state besides the platform
 * singleton. The registry is a handful of functions over plain records (`Entry`), so that it can
 * move into memory shared by every isolate of the process.
 */
import { hex, RedefineError } from "./errors.ts";
import { CodePool } from "./code_memory.ts";
import type { CodeWrite } from "./code_memory.ts";
import { archFor } from "./arch/mod.ts";
import type { Arch, RuntimeCode } from "./arch/types.ts";
import { OriginalStubs } from "./original.ts";
import { platform } from "../platform/mod.ts";
import type { Platform, SymbolInfo } from "../platform/mod.ts";

/** Writes collected by `transaction()` (src/transaction.ts), applied together when its body returns. */
export interface Batch {
  readonly writes: CodeWrite[];
  readonly commits: (() => void)[];
  readonly rollbacks: (() => void)[];
}

/** The process's platform and the state built on it, made on first use. */
export interface Machine {
  readonly platform: Platform;
  readonly pool: CodePool;
  readonly arch: Arch;
  readonly originals: OriginalStubs;
  /** The JS thread's identity as the guard stub reads it; computed on first use. */
  jsThread?: bigint;
  /** The runtime's own code and its FFI's part, as the guard stub tells them; found on first use. */
  runtimeCode?: RuntimeCode;
  /** Code shared by many patches, by its bytes: where each copy was placed. */
  readonly shared: Map<string, bigint[]>;
  /**
   * Symbols by address, as the OS found them: the lookup scans a library's whole symbol table, and
   * a loaded library's symbols do not move.
   */
  readonly symbols: Map<bigint, SymbolInfo | null>;
  /**
   * Entries no nearby code jumps into, with how many of their first bytes were checked: code does
   * not change under us (our own patches are read through), so a clean scan stays clean.
   */
  readonly cleanEntries: Map<bigint, number>;
  /** The open transaction, if any. */
  batch: Batch | null;
}

let current: Machine | undefined;

/** The machine, made on first use. */
export function machine(): Machine {
  if (current) return current;
  const p = platform();
  const arch = archFor(p.runtime.arch);
  current = {
    platform: p,
    pool: new CodePool(p),
    arch,
    originals: new OriginalStubs(p, arch),
    shared: new Map(),
    symbols: new Map(),
    cleanEntries: new Map(),
    batch: null,
  };
  return current;
}

/** What the registry knows of one live patch. */
export interface Entry {
  /** The function's entry. */
  readonly address: bigint;
  /** Where the entry jump is written (after a landing pad). */
  readonly at: bigint;
  /** The entry jump. */
  readonly written: Uint8Array;
  /** What `at` held before: the function's bytes, or the entry jump of the patch below. */
  readonly original: Uint8Array;
  /** Where the entry jump leads. */
  readonly destination: bigint;
  /**
   * Where a call that must not enter JS goes: for a JS replacement, where its guard sends calls
   * from other threads and re-entrant calls — past every JS layer below it; for any other patch,
   * its destination.
   */
  readonly bypass: bigint;
  /** Set while its restore waits for the enclosing transaction to commit. */
  restoring: boolean;
  /** Puts the function back (the Patch handle's `restore`). */
  readonly restore: () => void;
}

/** The live patches, oldest first. */
const live: Entry[] = [];
/** The live patches of each function, by its entry, oldest first: each layered on the one before. */
const stacks = new Map<bigint, Entry[]>();
/** Live patches by the 64-byte block their entry jump starts in, to find neighbours quickly. */
const byBlock = new Map<bigint, Entry[]>();
const BLOCK = 64n;
/** No entry jump is longer than this (x86-64's 14 bytes, arm64's 16). */
const LONGEST_JUMP = 16n;
let restoresAtExit = false;

/** Records a patch as live, layered on the function's newest live patch if it has one. */
export function register(entry: Entry): void {
  if (!restoresAtExit) {
    restoreAtExit();
    restoresAtExit = true;
  }
  live.push(entry);
  stacks.set(entry.address, [...layers(entry.address), entry]);
  const block = entry.at / BLOCK;
  byBlock.set(block, [...(byBlock.get(block) ?? []), entry]);
}

/** Forgets a patch: restored, or abandoned before its entry was written. */
export function unregister(entry: Entry): void {
  live.splice(live.lastIndexOf(entry), 1);
  const rest = layers(entry.address).filter((e) => e !== entry);
  if (rest.length) stacks.set(entry.address, rest);
  else stacks.delete(entry.address);
  const block = entry.at / BLOCK;
  const neighbours = byBlock.get(block)!.filter((e) => e !== entry);
  if (neighbours.length) byBlock.set(block, neighbours);
  else byBlock.delete(block);
}

/** The live patches of the function at `address`, oldest first: each is layered on the one before. */
export function layers(address: bigint): readonly Entry[] {
  return stacks.get(address) ?? [];
}

/** Every live patch, newest first: the order they can be restored in. */
export function newestFirst(): Entry[] {
  return [...live].reverse();
}

/**
 * Refuses to write or relocate the `covers` bytes at `at` when they hold another function's live
 * entry jump (aliases and internal entry points sit inside other functions): restoring one would
 * leave the other with a copy of a jump into freed memory.
 */
export function refuseOverlap(at: bigint, covers: number): void {
  // Patches of the same function write at the same place: those are layers, not overlaps.
  const overlap = near(at, at + BigInt(covers)).find((entry) =>
    entry.at !== at && entry.at < at + BigInt(covers) && at < entry.at + BigInt(entry.written.length)
  );
  if (overlap) {
    throw new RedefineError(
      "ALREADY_PATCHED",
      `the first ${covers} bytes at ${hex(at)} overlap the entry jump of the function redefined at ` +
        `${hex(overlap.address)}: restore that patch first.`,
    );
  }
}

/**
 * Puts back, in `bytes` (read from `start`), the function bytes under the live entry jumps they
 * hold, so that a decoder sees the original code.
 */
export function readThrough(bytes: Uint8Array, start: bigint): void {
  for (const entry of near(start, start + BigInt(bytes.length))) {
    // A layered patch's `original` is the jump of the patch below; the lowest holds the function's.
    if (layers(entry.address)[0] !== entry) continue;
    const offset = Number(entry.at - start);
    entry.original.forEach((b, i) => {
      if (offset + i >= 0 && offset + i < bytes.length) bytes[offset + i] = b;
    });
  }
}

/** Live patches whose entry jump may touch [from, to). */
function near(from: bigint, to: bigint): Entry[] {
  const found: Entry[] = [];
  for (let block = (from - LONGEST_JUMP) / BLOCK; block <= (to - 1n) / BLOCK; block++) {
    found.push(...(byBlock.get(block) ?? []));
  }
  return found;
}

/**
 * Puts every function back when the process exits normally (Deno's `unload` event, Bun's
 * `process.on("exit")`): native code that runs later — other threads, atexit handlers — must not
 * jump into callbacks the runtime is tearing down. Each patch alone: one that refuses does not
 * keep the others in place.
 */
function restoreAtExit(): void {
  const restoreEach = () => {
    for (const entry of newestFirst()) {
      try {
        entry.restore();
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
