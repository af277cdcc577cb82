/**
 * What to redefine and where its entry jump may go: `locate()` turns a target (a symbol or an
 * address, with a signature) into a `Site` — an executable entry that starts an instruction, the
 * bytes that belong to the function there, and no code elsewhere that jumps into the bytes the
 * entry jump would overwrite — or refuses it with a `RedefineError` before anything is written.
 */
import { hex, RedefineError } from "./errors.ts";
import { checkSignature } from "./signature.ts";
import type { NativeType } from "./signature.ts";
import { holdsAt, knownPlace, layers, liveBytes, machine, mappingAt, readThrough, refuseOverlap, staleMapping } from "./registry.ts";
import type { KnownPlace, Machine } from "./registry.ts";
import { checkName } from "./introspect.ts";
import { mappedNow } from "./code_memory.ts";
import type { Mapping, SymbolInfo } from "../platform/mod.ts";
import { PROT_EXEC, PROT_READ, PROT_WRITE, sameMemory } from "../platform/mod.ts";

/**
 * A function to redefine, named by its symbol.
 *
 * @example
 * ```ts
 * import type { SymbolTarget } from "@redefine/redefine";
 * const strlen: SymbolTarget<["pointer"], "u64"> = {
 *   symbol: "strlen",
 *   library: "libc.so.6",
 *   parameters: ["pointer"],
 *   result: "u64",
 * };
 * ```
 */
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
  /** See {@linkcode AddressTarget.originalSlot}. */
  readonly originalSlot?: bigint;
  /**
   * Only the calls these loaded libraries make through their import tables are redefined (file
   * names as the loader lists them, `"libsqlite3.so.0"`, or paths): their import slots for the
   * symbol are rewritten and the function itself is left alone, so the runtime and every other
   * library keep calling it. Libraries loaded after the patch are not affected.
   */
  readonly callers?: string | readonly string[];
}

/**
 * A function to redefine, named by its entry address.
 *
 * @example
 * ```ts
 * import { find } from "@redefine/redefine";
 * import type { AddressTarget } from "@redefine/redefine";
 * const [getpid] = find("getpid");
 * if (getpid) {
 *   const target: AddressTarget<[], "i32"> = { address: getpid.address, size: 16, parameters: [], result: "i32" };
 * }
 * ```
 */
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
  /**
   * A pointer-sized, writable slot that redefine fills with the original's address (the
   * trampoline) before the entry jump goes live, as MinHook's `ppOriginal`: a native replacement
   * reads it there to call the original, from its very first call. Once the patch is restored, the
   * slot holds the function's own address.
   */
  readonly originalSlot?: bigint;
}

/**
 * What to redefine: a symbol or an address, with the function's signature. A labeled parameter
 * tuple names the parameters in the types inferred from it (`original: (n: bigint) => bigint`).
 *
 * @example
 * ```ts
 * import { wrap } from "@redefine/redefine";
 * import type { Target } from "@redefine/redefine";
 * const labs: Target<[n: "i64"], "i64"> = { symbol: "labs", parameters: ["i64"], result: "i64" };
 * using patch = wrap(labs, (original) => (n) => original(n) + 1n);
 * ```
 */
export type Target<P extends readonly NativeType[], R extends NativeType> =
  | SymbolTarget<P, R>
  | AddressTarget<P, R>;

/** A checked place to write an entry jump. */
export interface Site<P extends readonly NativeType[], R extends NativeType> {
  /** The function's entry (the symbol's address). */
  readonly address: bigint;
  /** Where the entry jump goes: the entry, or just after a landing pad such as `endbr64`. */
  readonly at: bigint;
  /** How many bytes from `at` belong to the function and may be overwritten. */
  readonly room: number;
  /**
   * The function's bytes from `at` (at most `MAX_SCAN` from the entry), so the relocator can see
   * branches back into the bytes it moves: the live code, unless a live patch's jump is there
   * (then a copy with the function's own bytes). Use them before any write.
   */
  readonly code: Uint8Array;
  /** The target's signature, checked. */
  readonly signature: { readonly parameters: P; readonly result: R };
  /** Where to store the original's address before the entry jump goes live, or null. */
  readonly originalSlot: bigint | null;
  /** The executable mapping holding the entry, as checked: the entry's write needs no query. */
  readonly mapping: Mapping;
  /** What was learnt of `at` so far (the layout's plan and jump), found once for the patch. */
  readonly place: KnownPlace;
  /**
   * Set when `code` was not read from the live code but remembered (`KnownPlace.seen`): the bytes
   * from the entry, landing pad included, of which the transaction's commit compares those the
   * layout took (`CodeWrite.unread`) with the code before anything is written.
   */
  readonly unread?: Uint8Array | undefined;
}

/** How far into a function the relocator looks for branches back into its first bytes. */
const MAX_SCAN = 4096;
/** How far before a function to look for code jumping into its first bytes. */
const SCAN_BEFORE = 2048;
/**
 * The longest function whose bytes `locate` keeps for a transaction's next patch of it
 * (`KnownPlace.seen`): a copy and a comparison at the commit a patch, against a query of the map.
 */
const SEEN_MOST = 256;

/**
 * Finds and checks the place to redefine `target`: refuses what is not code, what is too short for
 * the shortest entry jump, what another live patch's entry jump covers, and entries that nearby
 * code jumps into.
 */
export function locate<P extends readonly NativeType[], R extends NativeType>(target: Target<P, R>): Site<P, R> {
  if (target === null || typeof target !== "object") {
    throw new RedefineError("INVALID_ADDRESS", "the target must be { symbol | address, parameters, result }.");
  }
  const signature = checkSignature(target, "the target's signature") as { parameters: P; result: R };
  const m = machine();
  const address = addressOf(m, target);
  const bySymbol = "symbol" in target && target.symbol !== undefined;
  const remembered = rememberedSite(m, address, target, bySymbol, signature);
  if (remembered) return remembered;
  const mapping = checkExecutable(address, "the function");
  refuseOurs(m, address);
  const originalSlot = slotOf(target.originalSlot);
  checkReadable(address, 1, mapping);
  const known = knownPlace(m, address, mapping);
  const extent = extentOf(m, address, known, target.size, bySymbol);
  checkReadable(address, extent, mapping);
  // Read in place: nothing writes code before the layout has used these bytes (a write waits for
  // the patch's schedule, or the transaction's end), and the patch keeps a copy of what it covers.
  let whole = liveBytes(address, Math.min(extent, MAX_SCAN));
  const pad = m.arch.landingPadLength(whole);
  const at = pad ? address + BigInt(pad) : address;
  const room = extent - pad;
  const shortest = m.arch.entryJumps[0].size;
  if (room < shortest) {
    throw new RedefineError(
      "FUNCTION_TOO_SHORT",
      `the function at ${hex(address)} is ${extent} bytes long; the shortest jump needs ` +
        `${shortest} after the ${pad}-byte landing pad: redefine a caller instead.`,
    );
  }
  // The function's own bytes, not its live patches' jump: a restore pending in this transaction
  // puts them back before this patch's jump lands.
  const lowest = layers(address)[0];
  if (lowest) {
    whole = whole.slice();
    whole.set(lowest.original.subarray(0, whole.length - pad), pad);
  }
  // Before anything is decoded there: the bytes may be the middle of another patch's jump.
  refuseOverlap(at, shortest);
  const place = pad ? knownPlace(m, at, mapping) : known;
  refuseJumpsIntoEntry(at, shortest, place);
  // Kept once every check has passed: no other patch's jump is in the bytes a layout takes.
  if (!lowest) remember(known, whole, extent, pad, target.size, bySymbol, mapping, address);
  return { address, at, room, code: pad ? whole.subarray(pad) : whole, signature, originalSlot, mapping, place };
}

/** Refuses an address inside redefine's own stubs. */
function refuseOurs(m: Machine, address: bigint): void {
  if (m.pool.contains(address) || m.originals.contains(address)) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `${hex(address)} is inside redefine's own stubs: redefine the original function instead.`,
    );
  }
}

/**
 * Keeps what `locate` read at an unpatched function's entry (`known`: its place, in `mapping`) for
 * a transaction's next patch of it, when the function is short, in a file's mapping, and all of it
 * was checked in that one mapping: its bytes decided every check but the instruction-start check
 * inside a symbol, which reads the symbol's own code (such an entry is not kept). Only a file's
 * mapping names its memory (device and inode), so that other code mapped there later is other
 * memory to `knownPlace`; anonymous memory mapped again at the same place with the same extent
 * and protection looks the same to the map, and its code may differ (the test suites' assembled
 * functions do, run after run): there the code is read each time.
 */
function remember(
  known: KnownPlace, whole: Uint8Array, extent: number, pad: number, size: number | undefined, bySymbol: boolean,
  mapping: Mapping, address: bigint,
): void {
  if (
    whole.length > SEEN_MOST || mapping.file === undefined || Number(mapping.end - address) < extent ||
    pastSymbolStart(known.symbol ?? null, address)
  ) {
    known.seen = null;
    return;
  }
  const was = known.seen;
  if (
    was && was.extent === extent && was.pad === pad && was.size === size && was.bySymbol === bySymbol &&
    was.bytes.length === whole.length && holdsAt(whole, 0, was.bytes)
  ) return;
  known.seen = { bytes: whole.slice(), extent, pad, size, bySymbol };
}

/**
 * In a transaction's body, the site of a function met before whose mapping this section has
 * found (stale only because user code ran since: not asked again), from what `locate` read there
 * last (`KnownPlace.seen`), when that is still the whole story: the same memory, the same target
 * size, no live patch, the entry's scan clean and no `originalSlot` to check. Reads no code and
 * asks nothing of the system; the commit compares the remembered bytes with the code (refusing
 * PATCH_MODIFIED, nothing written, where they differ) after asking the map again. Null: `locate`
 * reads and checks it afresh.
 */
function rememberedSite<P extends readonly NativeType[], R extends NativeType>(
  m: Machine, address: bigint, target: Target<P, R>, bySymbol: boolean, signature: { parameters: P; result: R },
): Site<P, R> | null {
  if (m.batch === null || target.originalSlot !== undefined) return null;
  // The section's answer first: anonymous memory (generated code) looks no further.
  const mapping = staleMapping(address);
  if (mapping === null || mapping.file === undefined) return null;
  const known = m.places.get(address);
  const seen = known?.seen;
  if (!seen || seen.size !== target.size || seen.bySymbol !== bySymbol) return null;
  if (!sameMemory(known!.memory, mapping) || layers(address).length !== 0) return null;
  refuseOurs(m, address);
  const { pad, bytes } = seen;
  const at = pad ? address + BigInt(pad) : address;
  const shortest = m.arch.entryJumps[0].size;
  // The same memory: what the place knows holds (as `knownPlace` would keep it).
  known!.memory = mapping;
  const place = pad ? knownPlace(m, at, mapping) : known!;
  if (place.clean < shortest) return null;
  refuseOverlap(at, shortest);
  const code = pad ? bytes.subarray(pad) : bytes;
  return { address, at, room: seen.extent - pad, code, signature, originalSlot: null, mapping, place, unread: bytes };
}

/**
 * Refuses an address that is not a 64-bit address, NULL, unmapped or not executable: it is not
 * code. Returns its mapping, as `lookup` finds it (by default as the map has it since user code
 * last ran: code about to be read).
 */
export function checkExecutable(address: bigint, what: string, lookup: (address: bigint) => Mapping | null = mappingAt): Mapping {
  checkAddress(address, what);
  const mapping = lookup(address);
  if (!mapping || !(mapping.protection & PROT_EXEC)) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `${what} ${hex(address)} is ${mapping ? "in a non-executable mapping" : "not mapped"}, so it is not ` +
        `code: check the address against the process's memory map, or name the function by its symbol.`,
    );
  }
  return mapping;
}

const TWO_64 = 2n ** 64n;

/** Refuses what cannot be a 64-bit address: NULL, negative or 2^64 and more. */
function checkAddress(address: bigint, what: string): void {
  if (address === 0n) {
    throw new RedefineError("INVALID_ADDRESS", `${what} is the NULL address: check where it came from.`);
  }
  if (address < 0n || address >= TWO_64) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `${what} ${address < 0n ? "-" + hex(-address) : hex(address)} is not a 64-bit address: check ` +
        `where it came from (an address is a bigint from 1 to 2^64 - 1).`,
    );
  }
}

/**
 * Refuses the `length` bytes of the function at `address` (in `mapping`) unless every one of them
 * is in readable, executable mappings, before anything reads them: a size running into an
 * inaccessible page, or an execute-only page, would fault.
 */
function checkReadable(address: bigint, length: number, mapping: Mapping): void {
  const code = PROT_READ | PROT_EXEC;
  // Nearly always one readable mapping holds it all: one bigint made, not two.
  if ((mapping.protection & code) === code && Number(mapping.end - address) >= length) return;
  const end = address + BigInt(length);
  for (let from = address, here: Mapping | null = mapping;; from = here.end, here = mappingAt(from)) {
    if (here && (here.protection & code) === code) {
      if (here.end >= end) return;
      continue;
    }
    if (from === address) {
      throw new RedefineError(
        "INVALID_ADDRESS",
        `the function at ${hex(address)} is in an execute-only mapping, and redefine must read the code ` +
          `it moves: make the page readable first (mprotect with PROT_READ | PROT_EXEC).`,
      );
    }
    throw new RedefineError(
      "INVALID_ADDRESS",
      `the ${length} bytes of the function from ${hex(address)} run past its code into ` +
        `${here ? "a mapping that is not readable code" : "unmapped memory"} at ${hex(from)}: pass a ` +
        `size that ends within the function (size ${length} is too large).`,
    );
  }
}

/** Checks an `originalSlot`: 8 writable bytes, pointer-aligned. */
function slotOf(slot: unknown): bigint | null {
  if (slot === undefined) return null;
  const what = "'originalSlot'";
  if (typeof slot !== "bigint") {
    throw new RedefineError("INVALID_ADDRESS", `${what} must be a bigint address, not ${typeof slot}.`);
  }
  checkAddress(slot, what);
  const mapping = mappingAt(slot);
  const data = PROT_READ | PROT_WRITE;
  if (slot % 8n !== 0n || !mapping || (mapping.protection & data) !== data || slot + 8n > mapping.end) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `${what} ${hex(slot)} is ${slot % 8n !== 0n ? "not 8-byte aligned" : "not writable memory"}: ` +
        `give the address of a pointer-sized variable the replacement reads.`,
    );
  }
  return slot;
}

/**
 * The address of `symbol` (in `library`, or anywhere), refusing names with a NUL inside: C reads
 * such a name only up to the NUL, which would name another symbol or library.
 */
export function symbolAddress(m: Machine, symbol: string, library: string | undefined): bigint {
  checkName(symbol, "symbol");
  if (library !== undefined) checkName(library, "library");
  return m.platform.os.symbolAddress(symbol, library);
}

/**
 * Refuses to overwrite the first `length` bytes at `at` (what was learnt of it: `place`) when
 * nearby code jumps into them: hand-written routines share code by jumping past each other's
 * first instruction (glibc's `mempcpy` jumps to `memmove` + 3).
 */
export function refuseJumpsIntoEntry(at: bigint, length: number, place: KnownPlace): void {
  const m = machine();
  if (place.clean >= length) return;
  const mapping = place.memory;
  const start = mapping.start > at - BigInt(SCAN_BEFORE) ? mapping.start : at - BigInt(SCAN_BEFORE);
  // The place's mapping may be the section's answer from before user code last ran (a site laid
  // out from remembered bytes, `rememberedSite`): the code before it is read once found mapped.
  if (!mappedNow(mappingAt, start, Number(at - start))) {
    throw new RedefineError("INVALID_ADDRESS", `the code before ${hex(at)} is no longer mapped: nothing was written.`);
  }
  const before = m.platform.runtime.view(start, Number(at - start)).slice();
  // Read through our own live patches: their jumps would throw the decoder off the original code.
  readThrough(before, start);
  const found = m.arch.branchesInto(before, start, at, at + BigInt(length));
  if (found.length) {
    throw new RedefineError(
      "UNRELOCATABLE",
      `code at ${found.map(hex).join(", ")} jumps into the first ${length} bytes of the function at ` +
        `${hex(at)}, which the entry jump would overwrite, so redefining it would break that code: ` +
        `redefine the function that jumps there, or a caller.`,
    );
  }
  place.clean = length;
}

function addressOf(m: Machine, target: Target<readonly NativeType[], NativeType>): bigint {
  if ("symbol" in target && target.symbol !== undefined) {
    if (typeof target.symbol !== "string" || target.symbol === "") {
      throw new RedefineError("SYMBOL_NOT_FOUND", "'symbol' must be a non-empty string (a C name).");
    }
    return symbolAddress(m, target.symbol, target.library);
  }
  const address = (target as AddressTarget<readonly NativeType[], NativeType>).address;
  if (typeof address !== "bigint") {
    throw new RedefineError(
      "INVALID_ADDRESS",
      "the target needs a 'symbol' (string) or an 'address' (bigint, e.g. 0x7f00_1234_5678n).",
    );
  }
  checkAddress(address, "the function");
  return address;
}

/** The symbol whose code holds `address` (what was learnt of it: `known`), looked up once per address. */
function symbolAt(m: Machine, address: bigint, known: KnownPlace): SymbolInfo | null {
  if (known.symbol === undefined) known.symbol = m.platform.os.symbolAt(address);
  return known.symbol;
}

/** Whether `address` lies inside `symbol`'s code past its first byte (where it may be mid-instruction). */
function pastSymbolStart(symbol: SymbolInfo | null, address: bigint): symbol is SymbolInfo {
  return symbol !== null && symbol.size > 0 && address > symbol.start && address < symbol.start + BigInt(symbol.size);
}

/**
 * Refuses an address that a symbol's code, decoded from its start, shows to be mid-instruction;
 * returns the symbol holding it.
 */
function checkInstructionStart(m: Machine, address: bigint, known: KnownPlace): SymbolInfo | null {
  const symbol = symbolAt(m, address, known);
  if (!pastSymbolStart(symbol, address)) return symbol;
  const offset = Number(address - symbol.start);
  const code = liveBytes(symbol.start, Math.min(symbol.size, offset + 16));
  if (m.arch.startsInstruction(code, symbol.start, offset) === false) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `${hex(address)} is inside an instruction of '${symbol.name}' (at +${offset}), where a jump would ` +
        `corrupt it: use the function's entry, ${hex(symbol.start)}.`,
    );
  }
  return symbol;
}

/** How many bytes from `address` belong to the function: a given size, or its symbol's extent. */
function extentOf(m: Machine, address: bigint, known: KnownPlace, size: number | undefined, bySymbol: boolean): number {
  const symbol = checkInstructionStart(m, address, known);
  if (size !== undefined) {
    if (!Number.isSafeInteger(size) || size <= 0) {
      throw new RedefineError(
        "FUNCTION_TOO_SHORT",
        `'size' must be a positive integer, not ${size}: pass the function's length in bytes.`,
      );
    }
    return size;
  }
  if (symbol && symbol.size > 0 && address >= symbol.start && address < symbol.start + BigInt(symbol.size)) {
    return Number(symbol.start + BigInt(symbol.size) - address);
  }
  if (bySymbol) {
    // An exported name with no symbol size of its own (glibc's ifunc-selected strlen, say): its
    // entry surely is a function's, and the straight run of code from there surely is its body.
    const mapping = mappingAt(address)!;
    const readable = mapping.end - address < 64n ? Number(mapping.end - address) : 64;
    const straight = m.arch.straightLineLength(liveBytes(address, readable), address);
    if (straight > 0) return straight;
  }
  throw new RedefineError(
    "UNKNOWN_SIZE",
    `no symbol tells how long the function at ${hex(address)} is` +
      `${symbol ? ` (nearest symbol: '${symbol.name}' at ${hex(symbol.start)})` : ""}, and redefine will ` +
      `not guess how many bytes it may overwrite: pass { size } with the function's length in bytes.`,
  );
}
