/**
 * What to redefine and where its entry jump may go: `locate()` turns a target (a symbol or an
 * address, with a signature) into a `Site` — an executable entry that starts an instruction, the
 * bytes that belong to the function there, and no code elsewhere that jumps into the bytes the
 * entry jump would overwrite — or refuses it with a `RedefineError` before anything is written.
 */
import { hex, RedefineError } from "./errors.ts";
import { checkSignature } from "./signature.ts";
import type { NativeType } from "./signature.ts";
import { layers, machine, readThrough, refuseOverlap } from "./registry.ts";
import type { Machine } from "./registry.ts";
import type { SymbolInfo } from "../platform/mod.ts";
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
  /**
   * Only the calls these loaded libraries make through their import tables are redefined (file
   * names as the loader lists them, `"libsqlite3.so.0"`, or paths): their import slots for the
   * symbol are rewritten and the function itself is left alone, so the runtime and every other
   * library keep calling it. Libraries loaded after the patch are not affected.
   */
  readonly callers?: string | readonly string[];
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
   * branches back into the bytes it moves.
   */
  readonly code: Uint8Array;
  /** The target's signature, checked. */
  readonly signature: { readonly parameters: P; readonly result: R };
}

/** How far into a function the relocator looks for branches back into its first bytes. */
const MAX_SCAN = 4096;
/** How far before a function to look for code jumping into its first bytes. */
const SCAN_BEFORE = 2048;

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
  checkExecutable(m, address, "the function");
  if (m.pool.contains(address)) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `${hex(address)} is inside redefine's own stubs: redefine the original function instead.`,
    );
  }
  const extent = extentOf(m, address, target.size, "symbol" in target && target.symbol !== undefined);
  const whole = m.platform.runtime.view(address, Math.min(extent, MAX_SCAN)).slice();
  const pad = m.arch.landingPadLength(whole);
  const at = address + BigInt(pad);
  const room = extent - pad;
  if (room < m.arch.nearJumpSize) {
    throw new RedefineError(
      "FUNCTION_TOO_SHORT",
      `the function at ${hex(address)} is ${extent} bytes long; the shortest jump needs ` +
        `${m.arch.nearJumpSize} after the ${pad}-byte landing pad: redefine a caller instead.`,
    );
  }
  // The function's own bytes, not its live patches' jump: a restore pending in this transaction
  // puts them back before this patch's jump lands.
  const lowest = layers(address)[0];
  if (lowest) whole.set(lowest.original.subarray(0, whole.length - pad), pad);
  // Before anything is decoded there: the bytes may be the middle of another patch's jump.
  refuseOverlap(at, m.arch.nearJumpSize);
  refuseJumpsIntoEntry(at, m.arch.nearJumpSize);
  return { address, at, room, code: whole.subarray(pad), signature };
}

/** Refuses an address that is NULL, unmapped or not executable: it is not code. */
export function checkExecutable(m: Machine, address: bigint, what: string): void {
  if (address === 0n) {
    throw new RedefineError("INVALID_ADDRESS", `${what} is the NULL address: check where it came from.`);
  }
  const mapping = m.platform.os.mappingAt(address);
  if (!mapping || !(mapping.protection & PROT_EXEC)) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `${what} ${hex(address)} is ${mapping ? "in a non-executable mapping" : "not mapped"}, so it is not ` +
        `code: check the address against the process's memory map, or name the function by its symbol.`,
    );
  }
}

/**
 * Refuses to overwrite the first `length` bytes at `at` when nearby code jumps into them:
 * hand-written routines share code by jumping past each other's first instruction (glibc's
 * `mempcpy` jumps to `memmove` + 3).
 */
export function refuseJumpsIntoEntry(at: bigint, length: number): void {
  const m = machine();
  if ((m.cleanEntries.get(at) ?? 0) >= length) return;
  const mapping = m.platform.os.mappingAt(at);
  const start = mapping && mapping.start > at - BigInt(SCAN_BEFORE) ? mapping.start : at - BigInt(SCAN_BEFORE);
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
  m.cleanEntries.set(at, length);
}

function addressOf(m: Machine, target: Target<readonly NativeType[], NativeType>): bigint {
  if ("symbol" in target && target.symbol !== undefined) {
    if (typeof target.symbol !== "string" || target.symbol === "") {
      throw new RedefineError("SYMBOL_NOT_FOUND", "'symbol' must be a non-empty string (a C name).");
    }
    return m.platform.os.symbolAddress(target.symbol, target.library);
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

/** The symbol whose code holds `address`, looked up once per address. */
function symbolAt(m: Machine, address: bigint): SymbolInfo | null {
  let symbol = m.symbols.get(address);
  if (symbol === undefined) m.symbols.set(address, symbol = m.platform.os.symbolAt(address));
  return symbol;
}

/** Refuses an address that a symbol's code, decoded from its start, shows to be mid-instruction. */
function checkInstructionStart(m: Machine, address: bigint): void {
  const symbol = symbolAt(m, address);
  if (!symbol || symbol.size === 0 || address <= symbol.start || address >= symbol.start + BigInt(symbol.size)) return;
  const offset = Number(address - symbol.start);
  const code = m.platform.runtime.view(symbol.start, Math.min(symbol.size, offset + 16)).slice();
  if (m.arch.startsInstruction(code, symbol.start, offset) === false) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `${hex(address)} is inside an instruction of '${symbol.name}' (at +${offset}), where a jump would ` +
        `corrupt it: use the function's entry, ${hex(symbol.start)}.`,
    );
  }
}

/** How many bytes from `address` belong to the function: a given size, or its symbol's extent. */
function extentOf(m: Machine, address: bigint, size: number | undefined, bySymbol: boolean): number {
  checkInstructionStart(m, address);
  if (size !== undefined) {
    if (!Number.isSafeInteger(size) || size <= 0) {
      throw new RedefineError(
        "FUNCTION_TOO_SHORT",
        `'size' must be a positive integer, not ${size}: pass the function's length in bytes.`,
      );
    }
    return size;
  }
  const symbol = symbolAt(m, address);
  if (symbol && symbol.size > 0 && address >= symbol.start && address < symbol.start + BigInt(symbol.size)) {
    return Number(symbol.start + BigInt(symbol.size) - address);
  }
  if (bySymbol) {
    // An exported name with no symbol size of its own (glibc's ifunc-selected strlen, say): its
    // entry surely is a function's, and the straight run of code from there surely is its body.
    const straight = m.arch.straightLineLength(m.platform.runtime.view(address, 64).slice(), address);
    if (straight > 0) return straight;
  }
  throw new RedefineError(
    "UNKNOWN_SIZE",
    `no symbol tells how long the function at ${hex(address)} is` +
      `${symbol ? ` (nearest symbol: '${symbol.name}' at ${hex(symbol.start)})` : ""}, and redefine will ` +
      `not guess how many bytes it may overwrite: pass { size } with the function's length in bytes.`,
  );
}
