/**
 * Writing code: the executable pool where stubs and trampolines live, and the all-or-nothing
 * transaction that writes into protected code (through the kernel's forced write where the system
 * has one and a run of pages takes few stores, else make the pages writable, write, put the
 * original protection back; then flush), undoing every step when one fails.
 */
import { hex, RedefineError } from "./errors.ts";
import type { CodeBlock, Mapping, Os, Platform, Runtime } from "../platform/mod.ts";
import { PROT_EXEC, PROT_READ, PROT_WRITE } from "../platform/mod.ts";

/** A piece of a code block handed to one patch: code, and optionally data next to it. */
export interface CodeSlot {
  readonly address: bigint;
  readonly size: number;
  /** Read+write bytes in the same block, within pc-relative reach of the code (0n when none). */
  readonly data: bigint;
  readonly dataSize: number;
  readonly block: PoolBlock;
}

/**
 * Bump allocation with free lists of exact sizes: slots come in few sizes, and a thousand freed
 * slots of one size are a stack taken from its end (not one list searched and spliced per slot).
 */
interface Arena {
  used: number;
  readonly size: number;
  /** Free offsets by slot size. */
  readonly free: Map<number, number[]>;
}

interface PoolBlock extends CodeBlock {
  readonly code: Arena;
  readonly dataArena: Arena;
  /** One view of the whole write alias, made on first write: the block is never unmapped. */
  aliasView?: Uint8Array;
  /**
   * One view of the whole data, made when a released slot's busy flag is first read there: under
   * Deno a view costs ~1 µs, and a restored transaction's every guard asks one.
   */
  dataBytes?: Uint8Array;
}

/**
 * The least code a new block maps: finding room near a target reads the whole memory map, so a
 * block serves hundreds of trampolines rather than one page's worth (Windows maps 64 KiB anyway).
 */
const MIN_BLOCK = 64 * 1024;

/**
 * At most this many data bytes per code byte in a whole block: the most any slot has (x86-64's
 * calling guard, 16 bytes of code before a 64-byte record), so a slot asking for more gets its
 * own data but no block-wide share of it.
 */
const MAX_DATA_RATIO = 4;

/** Slots start on this boundary: instruction fetch likes it and arm64 needs ≥ 4. */
const SLOT_ALIGN = 16;

/**
 * How long a released slot waits before it is reused: a thread that was already inside a stub or
 * trampoline when its patch was restored has that long to leave it. Measured on the monotonic
 * clock: a fake clock (`fakeClock()`) moves `Date.now()`.
 */
export const QUARANTINE_MS = 1000;

/**
 * A released slot waiting out its quarantine (see `CodePool.release`): its bytes stay as its last
 * owner left them until it is reused, or reclaimed by that owner's successor.
 */
export interface Quarantined {
  readonly slot: CodeSlot;
  readonly since: number;
  readonly busy: bigint | null;
  /** Still waiting: neither given back to the free lists nor reclaimed. */
  waiting: boolean;
}

/**
 * A request the system could not serve: no `size` bytes of code and data, all within [`low`,
 * `high`], found by the search made at `since`.
 */
interface Refusal {
  low: bigint;
  high: bigint;
  size: number;
  since: number;
}

/**
 * Executable memory shared by many patches: one page serves many stubs. Blocks are never unmapped:
 * their slots are reused, so the pool is as large as the most patches ever live at once, and
 * memory near a library (scarce: ±2 GiB on x86-64, ±128 MiB on arm64) stays ours for later patches.
 * Unmapping would also reach a thread still inside any stale stub, where reuse only reaches one
 * inside a slot reused at the same size.
 */
export class CodePool {
  readonly #platform: Platform;
  readonly #blocks: PoolBlock[] = [];
  /** Every page of the blocks (code, data, writable alias): `contains` asks it, not each block. */
  readonly #pages = new Set<bigint>();
  readonly #quarantine: Quarantined[] = [];
  /**
   * Searches the system failed lately (see `#refuses`): once the memory within an arm64 jump's
   * ±128 MiB of a library is gone, each patch there would read and parse the whole memory map
   * and try 256 places (under qemu: 4–23 patches in 1.5 s instead of ~45) before taking a
   * longer jump.
   */
  readonly #refusals: Refusal[] = [];
  /** The time slots released now are quarantined from, when a caller gave one (`releasedSince`). */
  #since: number | null = null;
  #pageBytes: bigint | undefined;

  constructor(platform: Platform) {
    this.#platform = platform;
  }

  /**
   * A slot of `size` code bytes (and `dataSize` data bytes) whose every byte is within `reach` of
   * `near`, or null when no such memory can be had.
   */
  allocate(near: bigint, reach: bigint, size: number, dataSize = 0): CodeSlot | null {
    this.#recycle();
    const codeSize = roundUp(size, SLOT_ALIGN);
    const dataBytes = roundUp(dataSize, SLOT_ALIGN);
    const within = (b: PoolBlock) => {
      const lo = b.address, hi = b.data + BigInt(b.dataSize);
      return (lo > near ? lo - near : near - lo) <= reach && (hi > near ? hi - near : near - hi) <= reach;
    };
    // Newest first: the block being filled has room, the older ones mostly have none, and whether
    // a block has room is cheaper to ask than whether it is in reach.
    for (let i = this.#blocks.length - 1; i >= 0; i--) {
      const block = this.#blocks[i]!;
      if (!fits(block.code, codeSize) || !fits(block.dataArena, dataBytes) || !within(block)) continue;
      const slot = take(block, codeSize, dataBytes);
      if (slot) return slot;
    }
    const { os } = this.#platform;
    // A whole block's data is sized so that slots like this one use up its code and its data
    // together (a JS replacement's guard record outweighs its code: one page would hold only 64 of
    // them, and every 64 patches would map a block); untouched data costs address space, not memory.
    // Where near space is too scarce for a whole block, the exact sizes may still fit.
    const blockSize = roundUp(Math.max(codeSize, MIN_BLOCK), os.pageSize);
    const ratio = Math.min(dataBytes / Math.max(codeSize, SLOT_ALIGN), MAX_DATA_RATIO);
    const blockData = roundUp(Math.max(blockSize * ratio, dataBytes, 1), os.pageSize);
    const small = codeSize < MIN_BLOCK;
    const least = small ? roundUp(codeSize, os.pageSize) + roundUp(Math.max(dataBytes, 1), os.pageSize) : blockSize + blockData;
    const low = near > reach ? near - reach : 0n, high = near + reach;
    const now = performance.now();
    if (this.#refuses(low, high, least, now)) return null;
    const fresh = os.allocateCode(near, reach, blockSize, blockData) ??
      (small ? os.allocateCode(near, reach, roundUp(codeSize, os.pageSize), roundUp(Math.max(dataBytes, 1), os.pageSize)) : null);
    if (!fresh) {
      this.#refused(low, high, least, now);
      return null;
    }
    this.#mapped(fresh.address, fresh.data + BigInt(fresh.dataSize));
    const block: PoolBlock = {
      ...fresh,
      code: { used: 0, size: fresh.size, free: new Map() },
      dataArena: { used: 0, size: fresh.dataSize, free: new Map() },
    };
    this.#blocks.push(block);
    const page = BigInt(os.pageSize);
    for (const [start, end] of [[block.address, block.data + BigInt(block.dataSize)], [block.writable, block.writable + BigInt(block.size)]] as const) {
      for (let p = start - start % page; p < end; p += page) this.#pages.add(p);
    }
    return take(block, codeSize, dataBytes);
  }

  /**
   * Whether the system is not asked for `size` bytes within [`low`, `high`]: a search failed
   * within the last quarantine for at most that many bytes in a window holding this one, so
   * every place this request could take, that search could have taken. Blocks of the pool are
   * searched before this is asked, so room in them (slots out of quarantine included) is never
   * refused; fewer bytes ask again, and so does a wider reach around the same entry (its window
   * is not held in the one that failed). What is missed is memory the process itself unmaps
   * there meanwhile (the pool never unmaps, and a block it maps there forgets the failure): it
   * waits one quarantine, as long as a released slot waits, where otherwise every patch near
   * that library would pay a failing search to find it sooner.
   */
  #refuses(low: bigint, high: bigint, size: number, now: number): boolean {
    const refusals = this.#refusals;
    for (let i = refusals.length - 1; i >= 0; i--) {
      const r = refusals[i]!;
      if (now - r.since >= QUARANTINE_MS) refusals.splice(i, 1);
      else if (r.low <= low && high <= r.high && r.size <= size) return true;
    }
    return false;
  }

  /**
   * Keeps a failed search. Two failed windows that overlap by at least either's size fail
   * together for the larger size: a run of that many bytes in their union has that many in one
   * of them. So entries of one library, each a little apart, make one window: the search fails
   * once for the lowest and once for the highest, and the entries between ask nothing.
   */
  #refused(low: bigint, high: bigint, size: number, now: number): void {
    const refusals = this.#refusals;
    let merged: Refusal = { low, high, size, since: now };
    for (let i = refusals.length - 1; i >= 0; i--) {
      const r = refusals[i]!;
      const most = Math.max(r.size, merged.size);
      const overlap = (r.high < merged.high ? r.high : merged.high) - (r.low > merged.low ? r.low : merged.low);
      if (overlap < BigInt(most)) continue;
      refusals.splice(i, 1);
      merged = {
        low: r.low < merged.low ? r.low : merged.low,
        high: r.high > merged.high ? r.high : merged.high,
        size: most,
        since: Math.min(r.since, merged.since),
      };
    }
    refusals.push(merged);
  }

  /**
   * Forgets the failed searches whose window holds some of a block just mapped at [`start`,
   * `end`): memory was freed there since, which a later search may find more of.
   */
  #mapped(start: bigint, end: bigint): void {
    const refusals = this.#refusals;
    for (let i = refusals.length - 1; i >= 0; i--) {
      if (refusals[i]!.low < end && start < refusals[i]!.high) refusals.splice(i, 1);
    }
  }

  /** Writes `bytes` at the start of `slot` (through the writable alias) and flushes them. */
  write(slot: CodeSlot, bytes: Uint8Array): void {
    if (bytes.length > slot.size) {
      throw new RedefineError("ALLOCATION_FAILED", `internal: ${bytes.length} bytes for a ${slot.size}-byte slot.`);
    }
    const { runtime, os } = this.#platform;
    const { block } = slot;
    block.aliasView ??= runtime.view(block.writable, block.size);
    block.aliasView.set(bytes, Number(slot.address - block.address));
    os.flushCode(slot.address, bytes.length);
  }

  /**
   * Gives a slot back; it is reused only after the quarantine, and never while the byte at `busy`
   * (a guard's flag: its replacement is running) is set.
   */
  release(slot: CodeSlot, busy: bigint | null): Quarantined {
    // Slots reclaimed meanwhile leave the queue here: a function patched and restored over and
    // over takes its slots back and never allocates, which is where the queue is otherwise swept.
    if (this.#quarantine.length > 0 && !this.#quarantine[0]!.waiting) this.#recycle();
    const waiting: Quarantined = { slot, since: this.#since ?? performance.now(), busy, waiting: true };
    this.#quarantine.push(waiting);
    return waiting;
  }

  /**
   * Runs `body` with every slot it releases quarantined from `since` rather than from a clock read
   * of its own: `since` is a time after the writes that made their code unreachable (a thread
   * inside still has the whole quarantine from there). A transaction's commits release a thousand
   * slots, and under Deno each read of the clock costs ~0.12 µs.
   */
  releasedSince<T>(since: number, body: () => T): T {
    const outer = this.#since;
    this.#since = since;
    try {
      return body();
    } finally {
      this.#since = outer;
    }
  }

  /**
   * Takes a released slot back before its quarantine ends, its bytes untouched, for the code that
   * held them to be used again as it is (a thread still inside sees the same code); false when it
   * was reused already, or its busy flag is set.
   */
  reclaim(released: Quarantined): boolean {
    if (!released.waiting || (released.busy !== null && !this.#idle(released.slot.block, released.busy))) return false;
    released.waiting = false;
    return true;
  }

  /** True when `address` lies in this pool's memory (patching it would patch ourselves). */
  contains(address: bigint): boolean {
    // Asked of every target: the page size is a bigint made once, not once a call.
    this.#pageBytes ??= BigInt(this.#platform.os.pageSize);
    return this.#pages.has(address - address % this.#pageBytes);
  }

  /** Executable bytes handed out and not given back, for the memory-per-patch measure. */
  get codeBytesInUse(): number {
    const freed = (a: Arena) => [...a.free].reduce((n, [size, offsets]) => n + size * offsets.length, 0);
    const quarantined = this.#quarantine.reduce((n, q) => n + (q.waiting ? q.slot.size : 0), 0);
    return this.#blocks.reduce((n, b) => n + b.code.used - freed(b.code), 0) - quarantined;
  }

  /** Whether the busy flag at `busy` (in `block`'s data, or anywhere) is clear. */
  #idle(block: PoolBlock, busy: bigint): boolean {
    const at = busy - block.data;
    if (at < 0n || at >= BigInt(block.dataSize)) return this.#platform.runtime.view(busy, 1)[0] === 0;
    block.dataBytes ??= this.#platform.runtime.view(block.data, block.dataSize);
    return block.dataBytes[Number(at)] === 0;
  }

  #recycle(): void {
    const queue = this.#quarantine;
    // Read only for a slot still waiting: a function patched and restored over and over finds
    // only its own reclaimed slot at the head (under Deno a clock read costs ~0.1 µs).
    let now = -1;
    // Oldest first; the ready ones leave in one splice (a shift each would move the whole
    // queue, tens of thousands of slots after many patches, once per slot). A reclaimed slot
    // leaves with them, not given back.
    let done = 0;
    for (; done < queue.length; done++) {
      const q = queue[done]!;
      if (!q.waiting) continue;
      if (now < 0) now = performance.now();
      if (now - q.since < QUARANTINE_MS || (q.busy !== null && !this.#idle(q.slot.block, q.busy))) break;
      q.waiting = false;
      const { slot } = q;
      give(slot.block.code, Number(slot.address - slot.block.address), slot.size);
      if (slot.dataSize) give(slot.block.dataArena, Number(slot.data - slot.block.data), slot.dataSize);
    }
    // All of them (a lone patch's one) without the list of them `splice` makes.
    if (done === queue.length) queue.length = 0;
    else if (done > 0) queue.splice(0, done);
  }
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/** Whether `carve` can give `size` bytes of `arena`. */
function fits(arena: Arena, size: number): boolean {
  return size === 0 || arena.used + size <= arena.size || (arena.free.get(size)?.length ?? 0) > 0;
}

function carve(arena: Arena, size: number): number | null {
  if (size === 0) return 0;
  const reuse = arena.free.get(size)?.pop();
  if (reuse !== undefined) return reuse;
  if (arena.used + size > arena.size) return null;
  arena.used += size;
  return arena.used - size;
}

/** Puts `size` bytes at `offset` back on `arena`'s free list. */
function give(arena: Arena, offset: number, size: number): void {
  const offsets = arena.free.get(size);
  if (offsets) offsets.push(offset);
  else arena.free.set(size, [offset]);
}

function take(block: PoolBlock, size: number, dataSize: number): CodeSlot | null {
  const code = carve(block.code, size);
  if (code === null) return null;
  const data = carve(block.dataArena, dataSize);
  if (data === null) {
    give(block.code, code, size);
    return null;
  }
  return {
    address: block.address + BigInt(code),
    size,
    data: dataSize ? block.data + BigInt(data) : 0n,
    dataSize,
    block,
  };
}

/** One write into protected code. */
export interface CodeWrite {
  readonly address: bigint;
  readonly bytes: Uint8Array;
  /**
   * The architecture's jump-to-itself, for writes at a live entry that no single store can cover:
   * it goes in first, so threads arriving meanwhile wait on it instead of running half-written code.
   */
  readonly spin?: Uint8Array;
  /**
   * The mapping the caller found holding `address` (the target's, as located, kept by its patch),
   * which spares the write a query of the memory map. Taken only for pages it says are mapped and
   * not writable, and only as proof that they are mapped and readable: a forced write needs nothing
   * more, whatever the page's protection is by now. A page to be made writable, or stored to
   * through the process's own mapping, has its protection asked of the system again.
   */
  readonly mapping?: Mapping | undefined;
  /**
   * The native code the written bytes lead to (a native replacement), where it is not ours: a
   * transaction's commit checks that it is still executable (src/registry.ts's `recheckHints`).
   */
  readonly leadsTo?: bigint | undefined;
  /**
   * The bytes the caller found at `address` or wrote there, which the write replaces (a patch's
   * entry: the function's bytes, or the jump of the patch below; a restore: its own jump). Not
   * used here: a transaction's commit refuses writes where user code changed them since.
   */
  readonly expected?: Uint8Array | undefined;
  /**
   * The bytes a patch was laid out from without reading them (what `locate` read last time,
   * `KnownPlace.seen`), from `at` (the function's entry: `address`, or a landing pad before it):
   * `expected` and more. Not used here: a transaction's commit compares them all with the code,
   * and refuses the transaction where they differ.
   */
  readonly unread?: { readonly at: bigint; readonly bytes: Uint8Array } | undefined;
}

/**
 * From how many stores on one run of non-writable pages a batch makes the run writable with one
 * `mprotect` (`VirtualProtect`) pair and stores plainly, rather than making one forced write per
 * store. Measured in this process (bench/transaction.bench.ts, "N stores on … and back", 2-core
 * VM; Deno, Bun and Node alike): a forced write (a `pwrite` to /proc/self/mem) costs 1.3–2 µs,
 * a pair with its batch's bookkeeping ~5.5 µs on a page of libc and ~8 µs on anonymous code (the
 * split and merge of its mapping; the TLB flush on the other core), a plain store ~0.2 µs. The
 * two ways cost the same at 2–3 stores on libc's pages and at 3–4 on anonymous code; at 4 the
 * pair costs 0.8–1.0× the forced writes there and 0.6–0.7× on libc, at 8 0.45–0.6×. Below 4 the
 * forced writes cost at most 1.2× the pair, and no page is ever writable and executable and no
 * mapping splits. A layer may ask for the protection way from fewer stores (`Os.protectFrom`):
 * Linux does from one, since threads running the code may see a forced write torn.
 */
export const PROTECT_FROM = 4;

/** The runs of a page the process may store to. */
const NO_RUNS: readonly Run[] = [];

/** From how many writes on one page one view of the whole page serves them (Deno: 4 small views cost one). */
const PAGE_VIEW_FROM = 4;

/** One page a batch writes. */
interface Page {
  readonly address: bigint;
  /** Where the next page starts (kept: each bigint sum costs an allocation). */
  readonly end: bigint;
  /** Its protection bits: the system's, or those of the caller's mapping (`exact` false). */
  readonly protection: number;
  readonly exact: boolean;
  /** The run of non-writable pages it belongs to (none when the process may store to it). */
  runs: readonly Run[];
  /** How many writes touch it. */
  writes: number;
  /**
   * Its bytes and its aligned words, once lent or `PAGE_VIEW_FROM` writes share one view. Null
   * until then, not absent: a field added later gives the page a new shape and a second block.
   */
  view: Uint8Array | null;
  words: BigInt64Array | null;
}

/** Where one write lands: its first page, its offset there, and the runs it stores to. */
interface Spot {
  readonly page: Page;
  readonly offset: number;
  /** How many pages it touches (consecutive from `page`). */
  readonly pages: number;
  runs: readonly Run[];
  /** Whether any page it touches is executable (writable ones too): then it is flushed. */
  exec: boolean;
  /** Where in the call's buffer the undo keeps what it replaces. */
  save: number;
}

/** Consecutive non-writable pages of one protection: one protection change, or forced writes. */
interface Run {
  readonly start: bigint;
  length: number;
  readonly protection: number;
  /** Whether every page's protection came from the system (else from a caller's mapping). */
  exact: boolean;
  /** How many stores the batch makes there. */
  stores: number;
  /** Whether its stores go through the forced write; false: it is made writable. */
  forced: boolean;
  /** Made writable (with its pages' exact protections in the batch's `opened`). */
  open: boolean;
  /** Its pages' exact protections, found when it is first made writable (an undo may make it so again). */
  spans: readonly Span[] | null;
  /** The list of it alone, which each of its pages and the spots on one page share. */
  alone: readonly Run[];
}

/** A span of pages of one protection. */
interface Span {
  readonly start: bigint;
  readonly length: number;
  readonly protection: number;
}

/** A span of pages whose protection was changed, and the protection it gets back. */
interface Opened extends Span {
  /** The run it was made writable for. */
  readonly run: Run;
}

/**
 * What a caller that writes often lends `writeCode` (src/registry.ts lends its own): views of the
 * pages it keeps, and short-lived bytes carved from a block it shares. A view is a foreign call
 * and, under Deno, a fresh buffer; a fresh array of its own costs ~0.2 µs in a patch's churn on
 * every runtime, and a lone write made two.
 */
export interface Lent {
  /**
   * A live view of the whole page at `page` (page-aligned). Asked only once the write has found
   * the page mapped: a view is only a pointer, and keeping one keeps nothing mapped.
   */
  page(page: bigint): Uint8Array;
  /** `length` bytes from an 8-byte boundary that no one else uses, their contents any. */
  scratch(length: number): Uint8Array;
}

/** How `writeCode` goes about it. */
export interface WriteOptions {
  /**
   * From how many stores on one run of pages it is made writable instead of written the forced
   * way (the layer's `Os.protectFrom`, else `PROTECT_FROM`); Infinity, for benches that time the
   * forced way on purpose: wherever the system allows.
   */
  readonly protectFrom?: number;
  /** What the caller lends (see `Lent`). */
  readonly lent?: Lent;
}

/** One call of `writeCode`: what its stores share. */
interface Writing {
  readonly os: Os;
  readonly runtime: Runtime;
  readonly size: number;
  readonly lent: Lent | undefined;
  /**
   * One buffer for the call (a typed array costs Deno ~0.2 µs to make): the word being composed
   * (bytes 0–7), then what each write replaces — its aligned word, or its bytes — for the undo.
   */
  readonly buffer: Uint8Array;
  readonly word: Uint8Array;
  /** `word` as one value, made for the first plain store (a forced one passes the bytes). */
  wordValue: BigInt64Array | null;
  /** The protections changed so far, to be given back. */
  readonly opened: Opened[];
}

/**
 * Writes every `writes` entry into code pages as one transaction. Each run of non-writable pages
 * goes one of two ways, by how many stores the batch makes there (`WriteOptions.protectFrom`,
 * else the layer's `Os.protectFrom`, else `PROTECT_FROM`): the kernel's
 * forced write for each store (`Os.forceWrite`: no protection changes at all), or, for many
 * stores, one protection change making the run writable (keeping its execute bit, since other
 * threads may be running code there), plain stores, and its exact original protection back at the
 * end. Where the forced write is refused the run is made writable; where that is refused the
 * forced write is tried. The code is flushed. If any step fails (giving a protection back
 * included), bytes already written are put back, each the way its pages take a store by then,
 * and every protection restored.
 */
export function writeCode(platform: Platform, writes: readonly CodeWrite[], options: WriteOptions = {}): void {
  const { protectFrom = platform.os.protectFrom ?? PROTECT_FROM, lent } = options;
  const spots = spotsOf(platform, writes);
  let total = 8;
  for (let i = 0; i < writes.length; i++) {
    const spot = spots[i]!;
    const offset = spot.offset % 8;
    for (const run of spot.runs) run.stores += storesOf(writes[i]!, offset);
    spot.save = total;
    total += undoLength(writes[i]!, offset);
  }
  for (const spot of spots) for (const run of spot.runs) run.forced = run.stores < protectFrom;
  const buffer = lent ? lent.scratch(total) : new Uint8Array(total);
  const w: Writing = {
    os: platform.os,
    runtime: platform.runtime,
    size: platform.os.pageSize,
    lent,
    buffer,
    word: buffer.subarray(0, 8),
    wordValue: null,
    opened: [],
  };
  // How many writes were made (or begun): the undo puts back what each replaced.
  let done = 0;
  try {
    for (let index = 0; index < writes.length; index++) {
      const { address, bytes, spin } = writes[index]!;
      if (bytes.length === 0) continue;
      const spot = spots[index]!;
      done = index + 1;
      if (store(w, spot, address, bytes, spin, forcedFor(w, spot), spot.save)) continue;
      // The forced write refused, with nothing written: the pages are made writable instead.
      done = index;
      for (const run of spot.runs) if (!run.open) open(w, run);
      done = index + 1;
      store(w, spot, address, bytes, spin, false, spot.save);
    }
    // Inside the try: a protection that cannot be given back undoes the bytes too.
    close(w);
  } catch (error) {
    const unwritten = undo(w, writes, spots, done);
    const unclosed = closing(w);
    flush(w, writes, spots);
    if (unwritten === null && unclosed === null) throw error;
    const what = unwritten === null ? `the bytes are back, but ${unclosed}` : unclosed === null ? unwritten : `${unwritten}, and ${unclosed}`;
    throw new RedefineError(
      "PROTECT_FAILED",
      `${messageOf(error)} Then putting everything back failed too: ${what}.`,
      { cause: error },
    );
  }
  flush(w, writes, spots);
}

/**
 * Whether a store on `spot` now goes the forced way: while any of its runs is not writable, unless
 * those are runs to make writable (many stores), and the system lets them be.
 */
function forcedFor(w: Writing, spot: Spot): boolean {
  let forced = false;
  let toOpen = true;
  for (const run of spot.runs) {
    if (run.open) continue;
    forced = true;
    if (run.forced) toOpen = false;
  }
  if (!forced || !toOpen) return forced;
  for (const run of spot.runs) if (!run.open && !tryOpen(w, run)) return true;
  return false;
}

/**
 * Puts back what each of the first `done` writes replaced, newest first, each the way its pages
 * take a store now: a run whose protection was already given back is made writable again, or
 * written the forced way. Tries every write; says what failed, or null.
 */
function undo(w: Writing, writes: readonly CodeWrite[], spots: readonly Spot[], done: number): string | null {
  let failed: string | null = null;
  for (let index = done - 1; index >= 0; index--) {
    const write = writes[index]!;
    if (write.bytes.length === 0) continue;
    const spot = spots[index]!;
    const before = w.buffer.subarray(spot.save, spot.save + undoLength(write, spot.offset % 8));
    try {
      if (putBack(w, spot, write, before, forcedFor(w, spot))) continue;
      for (const run of spot.runs) if (!run.open) open(w, run);
      putBack(w, spot, write, before, false);
    } catch (error) {
      failed ??= `the new bytes at ${hex(write.address)} stay (${messageOf(error)})`;
    }
  }
  return failed;
}

/** Stores `before`, what `write` replaced (its aligned word, or its bytes), back; false when the forced write refuses it. */
function putBack(w: Writing, spot: Spot, write: CodeWrite, before: Uint8Array, forced: boolean): boolean {
  const offset = spot.offset % 8;
  return offset + write.bytes.length <= 8
    ? storeWord(w, spot.page, spot.offset - offset, wordAt(write.address, offset), before, 0, forced, -1)
    : store(w, spot, write.address, before, write.spin, forced, -1);
}

/** `close`, after an undo: which pages stay writable, or null. */
function closing(w: Writing): string | null {
  try {
    close(w);
    return null;
  } catch (error) {
    const span = w.opened[0]!;
    return `${hex(span.start)} (${span.length} bytes) stays writable (${messageOf(error)})`;
  }
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** The whole page's view: the one lent, else for a page many writes share; null for the others. */
function pageView(w: Writing, page: Page): Uint8Array | null {
  if (page.view) return page.view;
  if (w.lent) return (page.view = w.lent.page(page.address));
  return page.writes < PAGE_VIEW_FROM ? null : (page.view = w.runtime.view(page.address, w.size));
}

/**
 * Stores `bytes` at `offset` into the aligned word `at` (`inPage` bytes into `page`), its other
 * bytes unchanged, in one store, so a thread running the code sees all of the old bytes or all
 * of the new ones; with `save` ≥ 0, the old word is kept there in the buffer first. False when the
 * forced write refuses it.
 */
function storeWord(
  w: Writing, page: Page, inPage: number, at: bigint, bytes: Uint8Array, offset: number, forced: boolean, save: number,
): boolean {
  const whole = pageView(w, page);
  const view = whole ?? w.runtime.view(at, 8);
  const from = whole ? inPage : 0;
  const { buffer, word } = w;
  for (let k = 0; k < 8; k++) buffer[k] = view[from + k]!;
  if (save >= 0) buffer.copyWithin(save, 0, 8);
  word.set(bytes, offset);
  if (forced) return w.os.forceWrite(at, word);
  const words = whole
    ? (page.words ??= new BigInt64Array(whole.buffer, whole.byteOffset, w.size / 8))
    : new BigInt64Array(view.buffer, view.byteOffset, 1);
  w.wordValue ??= new BigInt64Array(buffer.buffer, buffer.byteOffset, 1);
  Atomics.store(words, from / 8, w.wordValue[0]!);
  return true;
}

/** Stores `bytes` at `address` (`inPage` bytes into `page`) in one call; false when the forced write refuses them. */
function storeBytes(w: Writing, page: Page, inPage: number, address: bigint, bytes: Uint8Array, forced: boolean): boolean {
  if (forced) return w.os.forceWrite(address, bytes);
  const whole = inPage + bytes.length <= w.size ? pageView(w, page) : null;
  if (whole) whole.set(bytes, inPage);
  else w.runtime.view(address, bytes.length).set(bytes);
  return true;
}

/**
 * Stores `bytes` at `address`: in one aligned word when they fit in one; otherwise, given a
 * `spin`, the entry first becomes a jump to itself (one word store), then the tail is written,
 * then the head replaces the spin. False when the first store is refused (nothing written); a
 * refusal after that throws, and the undo puts the old bytes back.
 */
function store(
  w: Writing, spot: Spot, address: bigint, bytes: Uint8Array, spin: Uint8Array | undefined, forced: boolean, save: number,
): boolean {
  const { page, offset: inPage } = spot;
  const offset = inPage % 8;
  const at = wordAt(address, offset);
  if (offset + bytes.length <= 8) return storeWord(w, page, inPage - offset, at, bytes, offset, forced, save);
  if (save >= 0) {
    const whole = inPage + bytes.length <= w.size ? pageView(w, page) : null;
    w.buffer.set(whole ? whole.subarray(inPage, inPage + bytes.length) : w.runtime.view(address, bytes.length), save);
  }
  if (!spin || offset + spin.length > 8 || bytes.length <= spin.length) return storeBytes(w, page, inPage, address, bytes, forced);
  if (w.os.storeInOrder) return storeSpun(w, page, inPage - offset, at, bytes, spin, offset, forced);
  if (!storeWord(w, page, inPage - offset, at, spin, offset, forced, -1)) return false;
  w.os.flushCode(address, spin.length);
  const rest = storeBytes(w, page, inPage + spin.length, address + BigInt(spin.length), bytes.subarray(spin.length), forced) &&
    (w.os.flushCode(address, bytes.length), storeWord(w, page, inPage - offset, at, bytes.subarray(0, spin.length), offset, forced, -1));
  if (!rest) throw refusedAfterFirst(address);
  return true;
}

/**
 * `store`'s three stores, the jump to itself, the tail and the head, by one call of
 * `Os.storeInOrder`: no JS runs while the entry jumps to itself, so nothing the runtime does on
 * this thread meanwhile (a collection calling `getpid`, a binding calling `dlsym`) can call into
 * the function and wait there for the head that this thread alone would write. Both words are
 * made from the word as it is, `bytes` starting `offset` bytes into it at `at` (`inPage` bytes
 * into `page`).
 */
function storeSpun(
  w: Writing, page: Page, inPage: number, at: bigint, bytes: Uint8Array, spin: Uint8Array, offset: number, forced: boolean,
): boolean {
  const whole = pageView(w, page);
  const spun = whole ? whole.slice(inPage, inPage + 8) : w.runtime.view(at, 8).slice();
  const head = spun.slice();
  spun.set(spin, offset);
  head.set(bytes.subarray(0, 8 - offset), offset);
  const address = at + BigInt(offset);
  const made = w.os.storeInOrder!([
    { address: at, bytes: spun },
    { address: address + BigInt(spin.length), bytes: bytes.subarray(spin.length) },
    { address: at, bytes: head },
  ], forced);
  if (made === 0) return false;
  if (made < 3) throw refusedAfterFirst(address);
  return true;
}

/** A sequence's first store taken and a later one refused: the undo puts the old bytes back. */
function refusedAfterFirst(address: bigint): RedefineError {
  return new RedefineError(
    "PROTECT_FAILED",
    `the system took the first store into the code at ${hex(address)} and refused the next: nothing is left written.`,
  );
}

/** The aligned word holding `address`, `offset` bytes into it (an aligned one is its own: no bigint to make). */
function wordAt(address: bigint, offset: number): bigint {
  return offset === 0 ? address : address - BigInt(offset);
}

/** Makes `run` writable, each page keeping its exact protection's other bits. */
function open(w: Writing, run: Run): void {
  run.spans ??= run.exact ? run.alone : exactSpans(w.os, run);
  for (const span of run.spans) {
    w.os.protect(span.start, span.length, span.protection | PROT_WRITE);
    w.opened.push({ start: span.start, length: span.length, protection: span.protection, run });
  }
  run.open = true;
}

/** Opens `run`, or, where the system refuses, sends its stores the forced way. */
function tryOpen(w: Writing, run: Run): boolean {
  try {
    open(w, run);
    return true;
  } catch (error) {
    if (!(error instanceof RedefineError) || error.code !== "PROTECT_FAILED") throw error;
    run.forced = true;
    return false;
  }
}

/**
 * Gives every page made writable its exact protection back. Each span is forgotten once given
 * back, and its run counts as not writable again: where one fails, an undo knows which are.
 */
function close(w: Writing): void {
  let closed = 0;
  try {
    for (const span of w.opened) {
      w.os.protect(span.start, span.length, span.protection);
      span.run.open = false;
      closed++;
    }
  } finally {
    if (closed > 0) w.opened.splice(0, closed);
  }
}

/** Flushes each write that touches an executable page. */
function flush(w: Writing, writes: readonly CodeWrite[], spots: readonly Spot[]): void {
  for (let i = 0; i < writes.length; i++) {
    if (spots[i]!.exec) w.os.flushCode(writes[i]!.address, writes[i]!.bytes.length);
  }
}

/**
 * How many bytes the undo keeps of what `write` (`offset` bytes into its aligned word) replaces:
 * the word when it fits in one (one store, whichever way it goes), else its bytes.
 */
function undoLength(write: CodeWrite, offset: number): number {
  return offset + write.bytes.length <= 8 ? 8 : write.bytes.length;
}

/** How many stores `write` (`offset` bytes into its aligned word) takes: one, or three for spin, tail and head. */
function storesOf(write: CodeWrite, offset: number): number {
  const { bytes, spin } = write;
  return offset + bytes.length > 8 && spin && offset + spin.length <= 8 && bytes.length > spin.length ? 3 : 1;
}

/** The pages a call of `spotsOf` has found, and where it looks first. */
interface PageSearch {
  readonly os: Os;
  readonly page: bigint;
  /** Every page found, made for a second one: a lone write (every lone patch, most restores) touches one. */
  pages: Map<bigint, Page> | null;
  /** The mapping the system gave last. */
  known: Mapping | null;
  /** The page found last: writes come in address order more often than not. */
  last: Page | null;
}

/**
 * Where each write lands, every page it touches checked mapped (INVALID_ADDRESS before anything
 * is written), with its protection: from the caller's mapping where it has one that says not
 * writable, else from the system — one query per mapping; and the non-writable pages grouped in
 * runs of consecutive pages of one protection. Lists are made at their length, not grown: a
 * grown list reserves room for 16.
 */
function spotsOf(platform: Platform, writes: readonly CodeWrite[]): Spot[] {
  const { os } = platform;
  const size = os.pageSize;
  const page = BigInt(size);
  const search: PageSearch = { os, page, pages: null, known: null, last: null };
  const spots = new Array<Spot>(writes.length);
  for (let i = 0; i < writes.length; i++) {
    const w = writes[i]!;
    const hint = w.mapping && !(w.mapping.protection & PROT_WRITE) ? w.mapping : null;
    const first = pageAt(search, w.address, hint);
    first.writes++;
    const offset = Number(w.address - first.address);
    let count = 1;
    for (let at = offset + w.bytes.length - size, p = first.end; at > 0; at -= size, p += page, count++) {
      pageAt(search, p, hint).writes++;
    }
    spots[i] = { page: first, offset, pages: count, runs: first.runs, exec: false, save: 0 };
  }
  const { pages, last } = search;
  if (pages) {
    const closed: Page[] = [];
    for (const p of pages.values()) if (!(p.protection & PROT_WRITE)) closed.push(p);
    if (closed.length > 1) closed.sort((a, b) => (a.address < b.address ? -1 : a.address > b.address ? 1 : 0));
    let run: Run | null = null;
    for (let i = 0; i < closed.length; i++) {
      const p = closed[i]!;
      if (run && run.start + BigInt(run.length) === p.address && run.protection === p.protection) {
        run.length += size;
        run.exact &&= p.exact;
      } else {
        run = runOf(p, size);
      }
      p.runs = run.alone;
    }
  } else if (last && !(last.protection & PROT_WRITE)) {
    last.runs = runOf(last, size).alone;
  }
  for (let i = 0; i < spots.length; i++) {
    const spot = spots[i]!;
    spot.runs = spot.page.runs;
    spot.exec = (spot.page.protection & PROT_EXEC) !== 0;
    if (spot.pages === 1) continue;
    const runs: Run[] = [...spot.runs];
    for (let k = 1, p = spot.page.end; k < spot.pages; k++, p += page) {
      const next = pages!.get(p)!;
      spot.exec ||= (next.protection & PROT_EXEC) !== 0;
      for (const r of next.runs) if (!runs.includes(r)) runs.push(r);
    }
    spot.runs = runs;
  }
  return spots;
}

/** The page holding `address`, found once (see `spotsOf`). */
function pageAt(search: PageSearch, address: bigint, hint: Mapping | null): Page {
  const { last } = search;
  if (last && address >= last.address && address < last.end) return last;
  const p = address - address % search.page;
  if (last && !search.pages) search.pages = new Map([[last.address, last]]);
  let found = search.pages?.get(p);
  if (!found) {
    const given = hint && p >= hint.start && p < hint.end ? hint : null;
    const { known } = search;
    if (!given && (!known || p < known.start || p >= known.end)) search.known = search.os.mappingAt(p);
    const mapping = given ?? search.known;
    if (!mapping) throw new RedefineError("INVALID_ADDRESS", `${hex(p)} is not mapped: nothing was written.`);
    found = {
      address: p, end: p + search.page, protection: mapping.protection, exact: !given, runs: NO_RUNS, writes: 0, view: null, words: null,
    };
    search.pages?.set(p, found);
  }
  return (search.last = found);
}

/** A run of the one page `p` (of `size` bytes), to grow with the pages after it. */
function runOf(p: Page, size: number): Run {
  const run: Run = {
    start: p.address, length: size, protection: p.protection, exact: p.exact, stores: 0, forced: true, open: false, spans: null, alone: NO_RUNS,
  };
  run.alone = [run];
  return run;
}

/** `run`'s pages by their protection as the system has it now: consecutive pages of one protection merged. */
function exactSpans(os: Os, run: Run): Span[] {
  const spans: { start: bigint; length: number; protection: number }[] = [];
  const end = run.start + BigInt(run.length);
  for (let at = run.start; at < end;) {
    const mapping = os.mappingAt(at);
    if (!mapping) throw new RedefineError("INVALID_ADDRESS", `${hex(at)} is not mapped: nothing was written.`);
    const to = mapping.end < end ? mapping.end : end;
    const last = spans.at(-1);
    if (last && last.protection === mapping.protection) last.length += Number(to - at);
    else spans.push({ start: at, length: Number(to - at), protection: mapping.protection });
    at = to;
  }
  return spans;
}

/**
 * The mapping holding `address` as the memory map has it now (`lookup`), once each of the `length`
 * bytes from there is found in a readable mapping; null when one of them is not mapped at all.
 * A restore asks before it reads or writes a patch's place: the mapping found when the patch was
 * made is stale once its library is unloaded, and reading through it would crash.
 */
export function mappedNow(lookup: (address: bigint) => Mapping | null, address: bigint, length: number): Mapping | null {
  const end = address + BigInt(length);
  const first = lookup(address);
  for (let here = first, from = address; here; from = here.end, here = lookup(from)) {
    if (!(here.protection & PROT_READ)) {
      throw new RedefineError(
        "INVALID_ADDRESS",
        `${hex(from)} is mapped but no longer readable, so the bytes there cannot be checked or put back: ` +
          `make it readable again, then restore.`,
      );
    }
    if (here.end >= end) return first;
  }
  return null;
}
