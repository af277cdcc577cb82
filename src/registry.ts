/**
 * What redefine keeps for the process: the machine it runs on in this isolate (platform, arch,
 * code pool, original stubs, and what it has learnt about the code), and the registry of live
 * patches — which functions are patched, how patches of one function stack, whose entry jumps a
 * new one would overlap — shared by every isolate of the process (src/shared_registry.ts holds it
 * in native memory; here is this isolate's cache of it, and its own patches' handles). Changes to
 * code and to the registry happen under the process-wide lock (`exclusive`). The one home of module
 * state besides the platform singleton.
 */
import { hex, RedefineError } from "./errors.ts";
import { CodePool, mappedNow, writeCode } from "./code_memory.ts";
import type { CodeSlot, CodeWrite, Lent, Quarantined } from "./code_memory.ts";
import { archFor } from "./arch/mod.ts";
import { ANYWHERE } from "./arch/types.ts";
import type { Arch, EntryJump, GuardLayout, RelocationPlan, RuntimeCode } from "./arch/types.ts";
import { OriginalStubs } from "./original.ts";
import { openStore } from "./shared_registry.ts";
import type { Store } from "./shared_registry.ts";
import { platform, PROT_EXEC, sameMemory } from "../platform/mod.ts";
import type { Mapping, Platform, SymbolInfo } from "../platform/mod.ts";
import type { Signature } from "./signature.ts";

/** Writes collected by `transaction()` (src/transaction.ts), applied together when its body returns. */
export interface Batch {
  readonly writes: CodeWrite[];
  readonly commits: (() => void)[];
  readonly rollbacks: (() => void)[];
  /**
   * `writes` by address, in order, made on first use (src/transaction.ts's `pendingAt`): an
   * address written once holds its write, not a list of one.
   */
  byAddress?: Map<bigint, CodeWrite | CodeWrite[]> | undefined;
}

/** A relocation plan kept for an entry: what it was made for, and the bytes it moves. */
export interface KnownPlan {
  /** The bytes it frees. */
  readonly minLength: number;
  /** The length of the code it was planned from (its checks read all of it). */
  readonly extent: number;
  readonly moved: Uint8Array;
  readonly plan: RelocationPlan;
  /** The slot of the entry's last restored patch, while its code may be taken back (see `SlotReuse`). */
  spare: SlotReuse | null;
}

/**
 * A pool slot whose code was made from an entry's plan for the shortest entry jump: the relocated
 * first instructions, then the code `holds` names (src/layout.ts; a stub's slot in that jump's
 * reach, a lone trampoline's anywhere). Once its patch is gone the slot waits out its
 * quarantine with that code in place, as the plan's `spare`: the entry's next patch laid out the
 * same way takes it back (`CodePool.reclaim`) instead of relocating and writing the same bytes
 * into a fresh one.
 */
export interface SlotReuse {
  readonly plan: KnownPlan;
  /** What follows the relocated instructions: compared by identity. */
  readonly holds: object;
  /** The slot, once released. */
  released: Quarantined | null;
}

/** Releases `slot` to the pool's quarantine, kept as its plan's spare when `reuse` says what it holds. */
export function releaseSlot(slot: CodeSlot, busy: bigint | null, reuse: SlotReuse | null): void {
  const released = machine().pool.release(slot, busy);
  if (reuse === null) return;
  reuse.released = released;
  reuse.plan.spare = reuse;
}

/**
 * The slot of the plan's spare, taken back, when it holds `holds`; else null (the spare stays for
 * a later patch that matches).
 */
export function reclaimSpare(plan: KnownPlan, holds: object): CodeSlot | null {
  const spare = plan.spare;
  if (spare === null || spare.holds !== holds) return null;
  plan.spare = null;
  return machine().pool.reclaim(spare.released!) ? spare.released!.slot : null;
}

/** What was learnt of a function's entry, or of a place for an entry jump (see `Machine.places`). */
export interface KnownPlace {
  /**
   * The mapping holding it when last met: `symbol`, `clean` and `plan` describe the code in that
   * memory, and hold while the same memory is mapped there (see `knownPlace`).
   */
  memory: Mapping;
  /**
   * The symbol holding the entry, as the OS found it (undefined: not asked yet): the lookup scans
   * a library's whole symbol table, and a loaded library's symbols do not move.
   */
  symbol: SymbolInfo | null | undefined;
  /**
   * How many of its first bytes no nearby code jumps into, as checked (0: none): code does not
   * change under us while it stays mapped (our own patches are read through), so a clean scan
   * stays clean.
   */
  clean: number;
  /**
   * The relocation plan made for its first instructions, with the bytes it moves and what it was
   * made for (src/layout.ts's `relocationPlan`).
   */
  plan: KnownPlan | null;
  /**
   * The last entry jump made there, its form and where it leads (src/layout.ts's `entryJump`): a
   * function sent to the same place again gets the same bytes, which nothing writes to, without
   * making them again (under Deno a fresh array costs ~0.36 µs).
   */
  jump: { readonly jump: EntryJump; readonly to: bigint; readonly bytes: Uint8Array } | null;
  /**
   * For a function's entry: the bytes `locate` last read there, while they are its own (no live
   * patch), with what they were read for; a transaction's body lays a patch out from them without
   * reading the code again (src/target.ts's `rememberedSite`), and the commit compares them with
   * the code before anything is written. Null: not kept (a longer function, or not met yet).
   */
  seen?: Seen | null;
}

/** What `locate` read at a function's entry (see `KnownPlace.seen`). */
export interface Seen {
  /** The function's bytes from its entry: `min(extent, MAX_SCAN)` of them. */
  readonly bytes: Uint8Array;
  /** How many bytes from the entry belong to the function. */
  readonly extent: number;
  /** The landing pad's length at the entry. */
  readonly pad: number;
  /** The `size` the target gave, and whether it named a symbol: what the extent was found from. */
  readonly size: number | undefined;
  readonly bySymbol: boolean;
}

/**
 * Forgets every `KnownPlace.seen`: the code at one of them was found changed at a commit, so none
 * is trusted until read again.
 */
export function forgetSeen(m: Machine): void {
  for (const place of m.places.values()) place.seen = null;
}

/**
 * What was learnt of the place `at`, in `mapping` as the patch found it, a record made on first
 * use. What describes the code there (`symbol`, `clean`, `plan`, `seen`) is forgotten when other
 * memory is mapped there now (`sameMemory`: another file, or a region of another extent or protection), its
 * code unmapped and other code mapped in its place; `jump` depends on no code. The mapping is the
 * one the patch has asked for anyway: comparing it costs a few fields, not a query.
 */
export function knownPlace(m: Machine, at: bigint, mapping: Mapping): KnownPlace {
  let place = m.places.get(at);
  if (place === undefined) {
    m.places.set(at, place = { memory: mapping, symbol: undefined, clean: 0, plan: null, jump: null });
  } else if (place.memory !== mapping) {
    if (!sameMemory(place.memory, mapping)) {
      place.symbol = undefined;
      place.clean = 0;
      place.plan = null;
      place.seen = null;
    }
    place.memory = mapping;
  }
  return place;
}

/** This isolate's platform and the state built on it, made on first use. */
export interface Machine {
  readonly platform: Platform;
  readonly pool: CodePool;
  readonly arch: Arch;
  readonly originals: OriginalStubs;
  /** The runtime's own code and its FFI's part, as the guard stub tells them; found on first use. */
  runtimeCode?: RuntimeCode;
  /** Code shared by many patches, by its bytes: where each copy was placed. */
  readonly shared: Map<string, bigint[]>;
  /** The key in `shared` of each piece of shared code met so far. */
  readonly sharedKeys: WeakMap<Uint8Array, string>;
  /** The guard's layout by signature: its shared code is assembled once, not once a patch. */
  readonly guardLayouts: Map<string, GuardLayout>;
  /**
   * What was learnt of each function's entry and each place an entry jump was asked for (`at`: the
   * same record, but after a landing pad), one record an address ever patched: found once by
   * `locate`, which hands it on in its Site (one look-up a patch, not one a fact).
   */
  readonly places: Map<bigint, KnownPlace>;
  /** A view of each page read so far, by its address (see `liveBytes`): a small object a page. */
  readonly pages: Map<bigint, Uint8Array>;
  /** The page size, as a bigint for address arithmetic. */
  readonly pageBytes: bigint;
  /**
   * The size of the arch's longest entry jump (its absolute form), as a bigint: a live patch's
   * jump (or import slot, shorter) reaching an address starts less than this before it.
   */
  readonly longestJump: bigint;
  /** The block `keep` carves copies from, and how much of it is used. */
  kept: { block: Uint8Array; used: number };
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
    sharedKeys: new WeakMap(),
    guardLayouts: new Map(),
    places: new Map(),
    pages: new Map(),
    pageBytes: BigInt(p.os.pageSize),
    longestJump: BigInt(Math.max(...arch.entryJumps.map((jump) => jump.size))),
    kept: { block: new Uint8Array(0), used: 0 },
    batch: null,
  };
  return current;
}

/**
 * A live view of the `length` bytes at `address`, which the caller takes to be mapped and readable:
 * a piece of one view per page, kept. Making a view is a foreign call and, under Deno, a fresh
 * buffer (~0.3 µs); a piece of a kept one costs a small object. A view is only a pointer: keeping
 * one keeps nothing mapped. Callers read code a check has just found mapped, the pool's own memory,
 * or a live patch's entry, which is not asked of the map again (its library is taken to stay loaded
 * while it is patched).
 */
export function liveBytes(address: bigint, length: number): Uint8Array {
  const m = machine();
  const within = address % m.pageBytes;
  const offset = Number(within);
  if (offset + length > m.platform.os.pageSize) return m.platform.runtime.view(address, length);
  return keptPage(m, address - within).subarray(offset, offset + length);
}

/** Whether the live bytes at `address` are `expected`, compared in place (see `liveBytes`). */
export function liveHolds(address: bigint, expected: Uint8Array): boolean {
  const m = machine();
  const within = address % m.pageBytes;
  const offset = Number(within);
  if (offset + expected.length > m.platform.os.pageSize) {
    return holdsAt(m.platform.runtime.view(address, expected.length), 0, expected);
  }
  return holdsAt(keptPage(m, address - within), offset, expected);
}

/** The kept view of the page at `page`, made on first use. */
function keptPage(m: Machine, page: bigint): Uint8Array {
  let view = m.pages.get(page);
  if (!view) m.pages.set(page, view = m.platform.runtime.view(page, m.platform.os.pageSize));
  return view;
}

/** Whether `bytes` holds `expected` from `offset`. */
export function holdsAt(bytes: Uint8Array, offset: number, expected: Uint8Array): boolean {
  for (let i = 0; i < expected.length; i++) if (bytes[offset + i] !== expected[i]) return false;
  return true;
}

/**
 * The mapping holding `address`, or null when it is unmapped, as the map has it since user code
 * last ran: what a caller may read or write by. Within one `exclusive` section (one `redefine`,
 * one `restore`, one whole transaction) each mapping is asked of the OS once while only our code
 * runs: a lone patch's target and its native replacement in the same library make one query, a
 * thousand restores of one library one query, not a thousand. Only mappings found are kept, never
 * an answer of "unmapped", and only until the section ends: what a section maps itself (code pool
 * blocks, stub libraries) lands in free space, nothing of ours in it unmaps or moves a mapping, and
 * its writes give every page its protection back, so what it has seen stays true until user code
 * runs (see `userCodeRan`): from then on a mapping found before is asked again when something is
 * read or written by it, and serves only as a hint (`codeHint`) for what the commit checks anyway.
 */
export function mappingAt(address: bigint): Mapping | null {
  const known = sectionMappings;
  if (known === null) return machine().platform.os.mappingAt(address);
  // Indexed loops in this file and its callers' hot paths: a `for…of` step allocates wherever
  // the optimizing compiler has not reached yet, and a patch is a few hundred such steps.
  let stale = -1;
  for (let i = 0; i < known.length; i++) {
    const k = known[i]!;
    if (address < k.start || address >= k.end) continue;
    if (foundIn[i] === userRuns) return k;
    stale = i;
  }
  // The old answer comes back itself when the map says the same (no new object), and
  // `knownPlace` sees the memory it knows by identity.
  const found = machine().platform.os.mappingAt(address, stale >= 0 ? known[stale] : undefined);
  if (stale >= 0) {
    // What the map says there now takes the old answer's place: the list stays one entry a mapping.
    if (found) {
      known[stale] = found;
      foundIn[stale] = userRuns;
    } else {
      known.splice(stale, 1);
      foundIn.splice(stale, 1);
    }
  } else if (found) {
    if (known.length === 0) {
      sectionMappings = [found];
      foundIn = [userRuns];
    } else {
      known.push(found);
      foundIn.push(userRuns);
    }
  }
  return found;
}

/**
 * The mapping this section found holding `address` before user code last ran, or null (none
 * found, or found since): an answer that may be stale, for what is checked again at the commit
 * before anything is read or written by it (`KnownPlace.seen`). Asks nothing of the system.
 */
export function staleMapping(address: bigint): Mapping | null {
  const known = sectionMappings;
  if (known === null) return null;
  for (let i = 0; i < known.length; i++) {
    const k = known[i]!;
    if (address >= k.start && address < k.end) return foundIn[i] === userRuns ? null : k;
  }
  return null;
}

/**
 * The mapping holding `address` (see `mappingAt`), for code that nothing reads and that only needs
 * to be executable when the writes leading to it land: a native replacement. In a transaction's
 * body an answer found before user code last ran serves when it says executable — the commit
 * checks every such address again (`recheckHints`, `CodeWrite.leadsTo`) — and one that says
 * otherwise is asked again, so that no replacement is refused on an old answer.
 */
export function codeHint(address: bigint): Mapping | null {
  const known = sectionMappings;
  if (known !== null) {
    for (let i = 0; i < known.length; i++) {
      const k = known[i]!;
      if (address >= k.start && address < k.end && k.protection & PROT_EXEC) return k;
    }
  }
  return mappingAt(address);
}

/**
 * Says that user code may have run since the section last asked the map (a transaction's body, at
 * each of its calls and at its commit): it may have unmapped or reprotected anything, so every
 * mapping found so far is asked again before anything is read or written by it. Not while our
 * own calls run one after another (`ourCalls`).
 */
export function userCodeRan(): void {
  if (sectionMappings !== null && !ours) userRuns++;
}

/**
 * Whether a public call joins a section already open — a transaction's body calls it, holding the
 * lock — and runs as it is, without the function `exclusive` takes made for each call (a thousand
 * patches restored in one transaction, a thousand of them); then user code ran since the section's
 * last call (`userCodeRan`). False: the caller opens a section with `exclusive`.
 */
export function joinSection(): boolean {
  if (!holding()) return false;
  userCodeRan();
  return true;
}

/** Whether the calls under way are ours, one after another with no user code between (see `ourCalls`). */
let ours = false;

/**
 * Runs `body`, whose public calls (`restore()` of each patch, say) are ours, made one after another
 * with no user code between: what one has found of the map stays true for the next.
 */
export function ourCalls(body: () => void): void {
  const was = ours;
  ours = true;
  try {
    body();
  } finally {
    ours = was;
  }
}

/**
 * `writes` checked against the map as it is now, one query per distinct mapping (the section's,
 * `mappingAt`, asked again since user code ran): a hint (`CodeWrite.mapping`) that no longer holds
 * (its mapping shrunk, moved, unmapped or given another protection) is dropped, so the write asks
 * the system for its pages itself, and refuses an unmapped one; a write leading to native code
 * that is no longer executable (`CodeWrite.leadsTo`) is refused, nothing written. A transaction's
 * commit runs this, its body having run user code since its hints were found; the list is
 * `writes` itself unless a hint was dropped.
 */
export function recheckHints(writes: readonly CodeWrite[]): readonly CodeWrite[] {
  let out: CodeWrite[] | null = null;
  // Most writes share their mapping with the write before, and lead where it leads.
  let checked: Mapping | undefined;
  let holds = true;
  let code: Mapping | null = null;
  for (let i = 0; i < writes.length; i++) {
    const w = writes[i]!;
    const to = w.leadsTo;
    if (to !== undefined && (code === null || to < code.start || to >= code.end)) {
      code = mappingAt(to);
      if (code === null || !(code.protection & PROT_EXEC)) {
        throw new RedefineError(
          "BAD_REPLACEMENT",
          `the replacement ${hex(to)} is ${code ? "no longer executable" : "no longer mapped"} (the transaction's ` +
            `body ${code ? "changed its protection" : "unmapped it"}): nothing was written. Keep a native ` +
            `replacement's code in place while a patch leads to it.`,
        );
      }
    }
    const hint = w.mapping;
    if (!hint) continue;
    if (hint !== checked) {
      const now = mappingAt(hint.start);
      checked = hint;
      holds = now !== null && now.start <= hint.start && now.end >= hint.end && now.protection === hint.protection;
    }
    if (holds) continue;
    out ??= writes.slice();
    out[i] = { ...w, mapping: undefined };
  }
  return out ?? writes;
}

/** How many bytes each block of `keep` holds: a few hundred patches' entry bytes. */
const KEPT_BLOCK = 4096;

/**
 * A copy of the first `length` bytes of `bytes` (all of them by default) that a patch keeps (what its entry held), carved from a shared
 * block: under Deno a small array of its own costs a fresh buffer (~0.2 µs, a slice ~0.5 µs), a
 * piece of a block a small object. A block lives as long as any of its pieces.
 */
export function keep(bytes: Uint8Array, length: number = bytes.length): Uint8Array {
  if (length > KEPT_BLOCK / 16) return bytes.slice(0, length);
  const copy = carve(machine(), length, 1);
  for (let i = 0; i < length; i++) copy[i] = bytes[i]!;
  return copy;
}

/**
 * `length` bytes of the block `keep` carves from, from a multiple of `align`: no one else's piece,
 * ever (a full block is left to its pieces, and a new one made).
 */
function carve(m: Machine, length: number, align: number): Uint8Array {
  let used = Math.ceil(m.kept.used / align) * align;
  if (used + length > m.kept.block.length) {
    m.kept = { block: new Uint8Array(KEPT_BLOCK), used: 0 };
    used = 0;
  }
  m.kept.used = used + length;
  return m.kept.block.subarray(used, used + length);
}

/**
 * What the registry lends every write it makes (`writeCode`'s `Lent`): the page views
 * `liveBytes` keeps, and its scratch bytes carved as `keep` carves (a large batch's get their own).
 */
export const lent: Lent = {
  page: (page) => keptPage(machine(), page),
  scratch: (length) => length > KEPT_BLOCK / 16 ? new Uint8Array(length) : carve(machine(), length, 8),
};

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
  /**
   * Whose `restore()` puts the function back: the Patch handle (the handle itself, not a function
   * made for each patch); for another isolate's patch, one that refuses.
   */
  readonly handle: { restore(): void };
  /**
   * Kept by the registry, made -1, 0n, false: where the entry is in the process-wide store (-1
   * while it is not), whose it is, and whether it was made inert. On the entry itself, not in a
   * map beside it: a patch is registered, looked up and forgotten several times over.
   */
  slot: number;
  owner: bigint;
  retired: boolean;
  /**
   * Kept by the registry: the live patches of its function while it is in the cache (see
   * `Layers`), so that its own restore and forgetting look none up; null once forgotten. One a
   * rebuild of the cache has left out keeps a stale one, never read (see `sync`).
   */
  layers: Layers | null;
}

/**
 * The live patches of one function (or import slot), oldest first, each layered on the one before:
 * a new list on each change, as callers may hold the old.
 */
export interface Layers {
  list: readonly Entry[];
}

let store: Store | undefined;
/**
 * The store's generation this isolate's cache below reflects: the empty cache is a store no one has
 * written yet (generation 0, zeroed memory), so a first patch in a fresh process reads no records.
 */
let seen = 0n;
/** Whether the cache holds another isolate's patches (only those can be a dead isolate's). */
let others = false;
/** How deep this isolate is in `exclusive` calls: the lock is taken at 1 and given back at 0. */
let depth = 0;
/** The mappings found in the current `exclusive` section (see `mappingAt`); null outside one. */
let sectionMappings: Mapping[] | null = null;
/** For each of `sectionMappings`, the count of `userRuns` it was found at. */
let foundIn: number[] = [];
/** How many times user code may have run in sections so far (`userCodeRan`). */
let userRuns = 0;
/**
 * A section's mappings before it has found one, shared: a list grown from empty reserves room for
 * 16, and most sections find one or two.
 */
const NO_MAPPINGS: Mapping[] = Object.freeze([]) as never;
/** The live patches of the process, oldest first. */
let live: Entry[] = [];
/**
 * The live patches of each function, by its entry. A function's record stays once its last patch
 * goes, as `Machine.places` keeps one a function ever patched: a Map that loses its last keys
 * shrinks, a new table for each patch of a function patched and restored on its own (~150 B).
 */
let stacks = new Map<bigint, Layers>();
/**
 * Live patches by the 64-byte block their entry jump starts in, to find neighbours quickly. A
 * block's number is a plain number: a bigint key is hashed digit by digit, and each step of a
 * bigint loop is a new heap object.
 */
let byBlock = new Map<number, Entry[]>();
/**
 * This isolate's own patches, by their slot in the store (a list: slots are small numbers, taken
 * from the lowest free, and a Map that loses its last key shrinks, a new table each lone patch).
 */
const mine: (Entry | undefined)[] = [];
const BLOCK = 64;
let restoresAtExit = false;

/**
 * The block `address` is in (see `byBlock`): exact for every address below 2^53, far above any
 * process's; above, `Number` rounds, but never out of order, so a range of blocks still holds
 * every address between its ends. No bigint is made.
 */
function blockOf(address: bigint): number {
  return Math.floor(Number(address) / BLOCK);
}

/** The process-wide store, opened on first use with this isolate's identity. */
function theStore(): Store {
  if (store) return store;
  const m = machine();
  const bind = (address: bigint, signature: Signature) =>
    m.originals.acquire(`registry lock at ${address}`, signature, address).call;
  store = openStore(m.platform, m.pool, m.arch, () => threadPointer(m), bind);
  return store;
}

/** This isolate's identity word, holding the JS thread's pointer, which the guard stubs compare the running thread with. */
export function isolateIdentity(): bigint {
  return theStore().ownIdentity();
}

/** The JS thread's thread pointer, read by running the guard's own read on this thread. */
function threadPointer(m: Machine): bigint {
  if (!m.arch.guard) {
    throw new RedefineError("UNSUPPORTED_PLATFORM", `no ${m.arch.name} guard code reads the JS thread's pointer: use a native replacement.`);
  }
  const reader = m.arch.guard.threadPointerReader(m.platform.runtime.os);
  const slot = m.pool.allocate(0n, ANYWHERE, reader.length);
  if (!slot) throw new RedefineError("ALLOCATION_FAILED", "no executable memory for the thread probe.");
  m.pool.write(slot, reader);
  return BigInt(m.platform.runtime.fnPointer(slot.address, { parameters: [], result: "u64" })());
}

/** Whether this isolate holds the process-wide lock now (inside `exclusive`, a transaction's body say). */
export function holding(): boolean {
  return depth > 0;
}

/**
 * Runs `body` holding the process-wide lock on code and registry (taken once however deeply
 * nested): another isolate's patching waits, and what `body` reads of the registry stays true.
 */
export function exclusive<T>(body: () => T): T {
  const s = theStore();
  if (depth === 0) {
    // Counted only once the lock is held: a lock that throws (its lazy binding failing) must leave
    // no section open, or `holding()` would say so for ever and no lock or sync be taken again.
    s.lock();
    depth = 1;
    sectionMappings = NO_MAPPINGS;
    try {
      sync(s);
      reapDead(s);
    } catch (error) {
      depth = 0;
      sectionMappings = null;
      s.unlock();
      throw error;
    }
  } else {
    depth++;
  }
  try {
    return body();
  } finally {
    if (--depth === 0) {
      sectionMappings = null;
      s.unlock();
      // Outside the section: no code half-written (a write under way holds a live entry's jump to
      // itself, which the dynamic loader, run by a binding, may call on this thread).
      machine().platform.os.runDeferred?.();
    }
  }
}

/** Rebuilds the cache from the store when another isolate changed it. */
function sync(s: Store): void {
  if (s.generation() === seen) return;
  // Each entry kept gets its function's new record (`index`). One left out keeps its old one,
  // never read again: another isolate's entry is made afresh from its record, and this isolate's
  // leaves the store only under another's restore, as an inert patch whose handle is done.
  live = [];
  stacks = new Map();
  byBlock = new Map();
  others = false;
  const present = new Set<number>();
  for (const record of s.records()) {
    present.add(record.slot);
    if (record.owner !== s.identity) others = true;
    const entry = (record.owner === s.identity ? mine[record.slot] : undefined) ?? foreign(record);
    entry.slot = record.slot;
    entry.owner = record.owner;
    entry.retired = record.retired;
    index(entry);
  }
  for (let slot = 0; slot < mine.length; slot++) {
    const entry = mine[slot];
    if (entry === undefined || present.has(slot)) continue;
    entry.slot = -1;
    mine[slot] = undefined;
  }
  seen = s.generation();
}

/**
 * Another isolate's patch: known here by its record only. Calls that must not enter JS go through
 * its destination all the same: its guard knows its own thread, and sends others on.
 */
function foreign(record: { address: bigint; at: bigint; written: Uint8Array; original: Uint8Array; destination: bigint }): Entry {
  const { address, at, written, original, destination } = record;
  return {
    address, at, written, original, destination, bypass: destination, restoring: false, slot: -1, owner: 0n, retired: false,
    layers: null,
    handle: {
      restore() {
        throw new RedefineError("OUT_OF_ORDER", `the patch at ${hex(address)} belongs to another isolate (a Worker): restore it there.`);
      },
    },
  };
}

function index(entry: Entry): void {
  live.push(entry);
  let stack = stacks.get(entry.address);
  if (stack === undefined) stacks.set(entry.address, stack = { list: NO_LAYERS });
  stack.list = stack.list.length ? [...stack.list, entry] : [entry];
  entry.layers = stack;
  // A block's list changes in place: it is only ever read straight away (`refuseOverlap`,
  // `readThrough`), never held.
  const block = blockOf(entry.at);
  const neighbours = byBlock.get(block);
  if (neighbours) neighbours.push(entry);
  else byBlock.set(block, [entry]);
}

/** Records a patch of this isolate as live, layered on the function's newest live patch if it has one. */
export function register(entry: Entry): void {
  if (!restoresAtExit) {
    restoreAtExit();
    restoresAtExit = true;
  }
  const s = theStore();
  const slot = s.add(entry);
  mine[slot] = entry;
  entry.slot = slot;
  entry.owner = s.identity;
  entry.retired = false;
  index(entry);
  seen = s.generation();
}

/**
 * Forgets a patch: restored (`restored`: its restore wrote `restoredBytes`, which also undid the
 * inert patches right under it — they go too), or abandoned before its entry was written.
 */
export function unregister(entry: Entry, restored = false): void {
  const below = restored ? inertBelow(entry) : NO_LAYERS;
  const s = theStore();
  forget(s, entry);
  for (let i = 0; i < below.length; i++) forget(s, below[i]!);
  seen = s.generation();
}

/** Takes `entry` out of the store and the cache. */
function forget(s: Store, entry: Entry): void {
  if (entry.slot >= 0) {
    s.remove(entry.slot);
    mine[entry.slot] = undefined;
    entry.slot = -1;
  }
  // Restored newest first, it is nearly always the last.
  if (live[live.length - 1] === entry) live.pop();
  else live.splice(live.lastIndexOf(entry), 1);
  const stack = entry.layers ?? stacks.get(entry.address);
  if (stack) stack.list = stack.list.length === 1 && stack.list[0] === entry ? NO_LAYERS : stack.list.filter((x) => x !== entry);
  entry.layers = null;
  // A block's list stays once empty, as a function's record does.
  const neighbours = byBlock.get(blockOf(entry.at));
  if (neighbours?.[neighbours.length - 1] === entry) neighbours.pop();
  else if (neighbours) neighbours.splice(neighbours.indexOf(entry), 1);
}

/** The live patches of the function at `address`, oldest first: each is layered on the one before. */
export function layers(address: bigint): readonly Entry[] {
  return stacks.get(address)?.list ?? NO_LAYERS;
}

/** `layers(entry.address)`, for an entry of the cache, without a look-up. */
export function layersOf(entry: Entry): readonly Entry[] {
  return entry.layers ? entry.layers.list : layers(entry.address);
}

/** The layers of a function with none, shared: `layers` is asked several times a patch. */
const NO_LAYERS: readonly Entry[] = Object.freeze([]);

/** This isolate's live patches, newest first: the order they can be restored in. */
export function newestFirst(): Entry[] {
  // Alone in the process, every live patch is this isolate's, and none is retired (a patch is
  // retired only under another isolate's).
  if (!others) return live.slice().reverse();
  return live.filter((e) => e.slot >= 0 && mine[e.slot] === e && !e.retired).reverse();
}

/** Whether `entry` is another isolate's patch. */
export function isForeign(entry: Entry): boolean {
  return entry.slot >= 0 && entry.owner !== theStore().identity;
}

/**
 * Marks this isolate's patch inert in the registry: it stays in place under another isolate's
 * patch (whose original leads through it), its guard sending every call to the original.
 */
export function retire(entry: Entry): void {
  entry.retired = true;
  theStore().retire(entry.slot);
  seen = theStore().generation();
}

/** The inert patches (retired, or left by an isolate that ended) right under `entry`, nearest first. */
function inertBelow(entry: Entry): readonly Entry[] {
  const stack = layersOf(entry);
  // Alone on its function (nearly always): nothing below, and no list made.
  if (stack.length < 2) return NO_LAYERS;
  const s = theStore();
  const found: Entry[] = [];
  for (let i = stack.indexOf(entry) - 1; i >= 0; i--) {
    const below = stack[i]!;
    if (below.slot < 0 || !(below.retired || !s.alive(below.owner))) break;
    found.push(stack[i]!);
  }
  return found;
}

/**
 * What restoring `entry` writes back: what its entry held before it, and before the inert
 * patches right under it (each one's original laid over the bytes it covered).
 */
export function restoredBytes(entry: Entry): Uint8Array {
  const below = inertBelow(entry);
  // Alone, its own original is the whole answer (and is never written to).
  if (below.length === 0) return entry.original;
  const length = Math.max(entry.original.length, ...below.map((e) => e.original.length));
  // Past a patch's own bytes, the entry held before it what it holds now; the deeper wins.
  const bytes = liveBytes(entry.at, length).slice();
  for (const e of [entry, ...below]) bytes.set(e.original, 0);
  return bytes;
}

/**
 * Restores the newest patches of isolates that ended (their identity word cleared) when nothing
 * newer is layered on them and their entry still holds their jump: their guards already send every
 * call to the original, this puts the bytes back.
 */
function reapDead(s: Store): void {
  // Only another isolate's patch can be left by a dead one; this isolate's own are never, and
  // with a thousand of them live, looking at every stack would cost each patch made after them.
  if (!others) return;
  for (const { list: stack } of [...stacks.values()]) {
    let top = stack.at(-1);
    while (top && !s.alive(top.owner)) {
      try {
        // As a restore does (src/patch.ts): the library may have been unloaded since, and reading
        // its place would crash; a place gone has nothing to put back.
        if (mappedNow(mappingAt, top.at, Math.max(top.written.length, top.original.length))) {
          if (!liveHolds(top.at, top.written)) break;
          const write: CodeWrite = { address: top.at, bytes: restoredBytes(top), spin: machine().arch.selfLoop };
          writeCode(machine().platform, [write], { lent });
        }
      } catch (error) {
        // It stays inert where it is; this isolate's own patching must not fail for it.
        if (error instanceof RedefineError) break;
        throw error;
      }
      unregister(top, true);
      top = layers(stack[0]!.address).at(-1);
    }
  }
}

/**
 * Refuses to write or relocate the `covers` bytes at `at` when they hold another function's live
 * entry jump (aliases and internal entry points sit inside other functions): restoring one would
 * leave the other with a copy of a jump into freed memory.
 */
export function refuseOverlap(at: bigint, covers: number): void {
  if (live.length === 0) return;
  // Patches of the same function write at the same place: those are layers, not overlaps.
  // A bigint is a heap object: the two ends are made once, a neighbour's end only when it starts
  // just before ours, and the neighbours are walked in place (three checks a patch). A jump that
  // starts before `at` and reaches it starts after `reach`.
  const end = at + BigInt(covers);
  const longest = machine().longestJump;
  const reach = at - longest;
  // Only the blocks from `reach` to the last covered byte: the others hold only jumps that start
  // at or before `reach`, or at or after `end`. Worked out in numbers where they are exact (below
  // 2^53, far above any process's addresses): a thousand patches 16 bytes apart meet a block and
  // a quarter each, not three.
  const n = Number(at);
  const exact = n < 2 ** 53;
  const first = exact ? Math.floor((n - Number(longest)) / BLOCK) : blockOf(reach);
  const last = exact ? Math.floor((n + covers - 1) / BLOCK) : blockOf(end - 1n);
  for (let block = first; block <= last; block++) {
    const entries = byBlock.get(block);
    if (entries === undefined) continue;
    for (let i = 0; i < entries.length; i++) {
      const entry = entries[i]!;
      if (entry.at === at || entry.at >= end || entry.at <= reach) continue;
      if (entry.at < at && entry.at + BigInt(entry.written.length) <= at) continue;
      throw new RedefineError(
        "ALREADY_PATCHED",
        `the first ${covers} bytes at ${hex(at)} overlap the entry jump of the function redefined at ` +
          `${hex(entry.address)}: restore that patch first.`,
      );
    }
  }
}

/**
 * Puts back, in `bytes` (read from `start`), the function bytes under the live entry jumps they
 * hold, so that a decoder sees the original code.
 */
export function readThrough(bytes: Uint8Array, start: bigint): void {
  if (live.length === 0) return;
  // Each neighbour's bytes are copied over where they overlap, the blocks walked in place: the
  // first scan before a thousand entries patched in one transaction meets a hundred each. A jump
  // reaching `start` from before starts less than the longest jump before it.
  const last = blockOf(start) + Math.ceil(bytes.length / BLOCK);
  for (let block = blockOf(start - machine().longestJump); block <= last; block++) {
    const entries = byBlock.get(block);
    if (entries === undefined) continue;
    for (let i = 0; i < entries.length; i++) {
      const entry = entries[i]!;
      // A layered patch's `original` is the jump of the patch below; the lowest holds the function's.
      if (layersOf(entry)[0] !== entry) continue;
      const offset = Number(entry.at - start);
      const to = Math.min(entry.original.length, bytes.length - offset);
      for (let i = Math.max(0, -offset); i < to; i++) bytes[offset + i] = entry.original[i]!;
    }
  }
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
        entry.handle.restore();
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
