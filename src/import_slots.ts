/**
 * Redefining a function for some callers only (`callers`): the import slots through which the
 * named libraries call it — the GOT entries of its JUMP_SLOT and GLOB_DAT relocations — are found
 * and checked before anything is written, and each rewrite is one aligned 8-byte store. What a
 * slot held is what those callers reached before: the function, or the vDSO's code for glibc's
 * clock functions.
 */
import { hex, RedefineError } from "./errors.ts";
import { findModule, imports } from "./introspect.ts";
import type { LoadedModule, ModuleImport } from "./introspect.ts";

/** One import slot of one calling library. */
export interface CallerSlot {
  /** The library that calls through the slot. */
  readonly library: LoadedModule;
  /** The slot: 8 bytes, aligned. */
  readonly slot: bigint;
  /** What the slot holds now. */
  readonly held: bigint;
  readonly kind: ModuleImport["kind"];
}

/** The names `callers` gives, checked: one string or a non-empty list of them. */
export function callerNames(callers: unknown): string[] {
  const names = typeof callers === "string" ? [callers] : Array.isArray(callers) ? [...callers] : null;
  if (names === null || names.length === 0 || names.some((n) => typeof n !== "string")) {
    throw new RedefineError(
      "LIBRARY_NOT_FOUND",
      `'callers' must name the calling libraries: a file name as modules() lists it ("libsqlite3.so.0"), ` +
        `a path, or a non-empty list of them — not ${JSON.stringify(callers) ?? String(callers)}.`,
    );
  }
  return names;
}

/**
 * Every import slot through which the libraries `callers` names reach `symbol`, in the order
 * named. Throws LIBRARY_NOT_FOUND for a library that is not loaded and NOT_IMPORTED for one that
 * does not import the symbol; a library named twice counts once.
 */
export function callerSlots(symbol: string, callers: unknown): CallerSlot[] {
  const slots: CallerSlot[] = [];
  const seen = new Set<bigint>();
  for (const name of callerNames(callers)) {
    const library = findModule(name);
    if (seen.has(library.base)) continue;
    seen.add(library.base);
    const found = imports(library.path).filter((i) => i.name === symbol);
    if (found.length === 0) {
      throw new RedefineError(
        "NOT_IMPORTED",
        `'${library.name}' (${library.path}) does not import '${symbol}': it has no import slot to ` +
          `redirect, so its calls of '${symbol}' (if any) do not go through the loader. imports(` +
          `${JSON.stringify(library.name)}) lists what it does import; drop it from 'callers', or ` +
          `redefine '${symbol}' for the whole process.`,
      );
    }
    for (const { slot, target, kind } of found) {
      if (slot % 8n !== 0n) {
        throw new RedefineError(
          "INVALID_ADDRESS",
          `the import slot of '${symbol}' in '${library.name}' at ${hex(slot)} is not 8-byte aligned, ` +
            `so it cannot be rewritten in one store: nothing was written.`,
        );
      }
      slots.push({ library, slot, held: target, kind });
    }
  }
  return slots;
}

/**
 * Where calls through `slot` really went: what it holds, or — for a lazily bound slot, which
 * still points into its own library's PLT — the function the loader would bind (`resolve()`):
 * calling the PLT from anywhere else would bind the slot behind our back.
 */
export function callTarget(slot: CallerSlot, resolve: () => bigint): bigint {
  const { base, size } = slot.library;
  return slot.held >= base && slot.held < base + BigInt(size) ? resolve() : slot.held;
}

/** A slot's new value as the 8 little-endian bytes one store writes. */
export function pointerBytes(value: bigint): Uint8Array {
  const bytes = new Uint8Array(8);
  new DataView(bytes.buffer).setBigUint64(0, value, true);
  return bytes;
}
