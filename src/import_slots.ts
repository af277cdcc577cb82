/**
 * Redefining a function for some callers only (`callers`): the import slots through which the
 * named libraries call it — the GOT entries of its JUMP_SLOT and GLOB_DAT relocations — are found
 * and checked before anything is written, and each rewrite is one aligned 8-byte store. What a
 * slot held is what those callers reached before, and what `original` calls: the function, or the
 * vDSO's code for glibc's clock functions. Slots stack as entries do: a second patch of the same
 * slot is layered on the first, and its original is the first one's replacement.
 */
import { hex, RedefineError } from "./errors.ts";
import { checkName, findModule, imports } from "./introspect.ts";
import type { LoadedModule, ModuleImport } from "./introspect.ts";
import { checkSignature } from "./signature.ts";
import type { NativeType, Signature } from "./signature.ts";
import type { SymbolTarget } from "./target.ts";
import { discard, nativeAddress } from "./replacement.ts";
import type { Destination } from "./replacement.ts";
import { slotLayout } from "./slot_layout.ts";
import { Patch, Trampoline } from "./patch.ts";
import { layers, machine } from "./registry.ts";
import { schedule, transaction } from "./transaction.ts";

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

/**
 * Redefines `target.symbol` for the libraries `target.callers` names: every import slot they have
 * for it leads to the destination `destinationOf` makes for the signature (through the guard for a
 * JS one) until the patch is restored. Everything is checked before the first slot is written; the
 * slots are written together.
 */
export function redefineCallers<P extends readonly NativeType[], R extends NativeType>(
  target: SymbolTarget<P, R>,
  destinationOf: (signature: Signature) => Destination,
): Patch<P, R> {
  const signature = checkSignature(target, "the target's signature") as { parameters: P; result: R };
  checkName(target.symbol, "symbol");
  const slots = callerSlots(target.symbol, target.callers);
  const { os } = machine().platform;
  const resolve = () => os.symbolAddress(target.symbol, target.library);
  // What each slot holds once every earlier write (of an open transaction too) has landed, and
  // where that leads: the newest patch of it that stays, or the function. The function: what the
  // slot held before any patch of it.
  const beneath = slots.map((s) => {
    const stack = layers(s.slot);
    const under = stack.filter((entry) => !entry.restoring).at(-1);
    const unpatched = stack.length ? pointerAt(stack[0]!.original) : s.held;
    const fn = callTarget({ ...s, held: unpatched }, resolve);
    const bypass = under?.bypass ?? fn;
    return { original: under?.written ?? pointerBytes(unpatched), leadsTo: under?.destination ?? fn, bypass, fn };
  });
  const below = beneath[0]!.leadsTo;
  if (beneath.some((b) => b.leadsTo !== below)) {
    throw new RedefineError(
      "ALREADY_PATCHED",
      `the import slots of '${target.symbol}' in ${slots.map((s) => `'${s.library.name}'`).join(", ")} lead ` +
        `to different code (${[...new Set(beneath.map((b) => b.leadsTo))].map(hex).join(", ")}), some of ` +
        `them already redefined: redefine them for each library separately.`,
    );
  }
  const to = destinationOf(signature);
  let layout;
  try {
    layout = slotLayout(signature, to, below, beneath[0]!.bypass);
  } catch (error) {
    discard(to);
    throw error;
  }
  const written = pointerBytes(layout.destination);
  const patch = new Patch(beneath[0]!.fn, signature, {
    writes: slots.map((s, i) => ({ key: s.slot, at: s.slot, original: beneath[i]!.original, written })),
    destination: layout.destination,
    stub: layout.stub,
    trampoline: Trampoline.at(below),
    callback: to.kind === "callback" ? to.callback : null,
    busy: layout.busy,
    bypass: layout.bypass,
    originalSlot: null,
    counter: layout.counter,
    counters: layout.counters,
  });
  transaction(() => {
    for (const s of slots) schedule({ address: s.slot, bytes: written, leadsTo: nativeAddress(to) }, () => {}, () => patch.abandon());
  });
  return patch;
}

function pointerAt(bytes: Uint8Array): bigint {
  return new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true);
}
