/**
 * Writing code: the executable pool where stubs and trampolines live, and the all-or-nothing
 * transaction that writes into protected code (through the kernel's forced write where the system
 * has one, else make the pages writable, write, put the original protection back; then flush),
 * undoing every step when one fails.
 */
import { hex, RedefineError } from "./errors.ts";
import type { CodeBlock, Mapping, Platform } from "../platform/mod.ts";
import { PROT_EXEC, PROT_WRITE } from "../platform/mod.ts";

/** A piece of a code block handed to one patch: code, and optionally data next to it. */
export interface CodeSlot {
  readonly address: bigint;
  readonly size: number;
  /** Read+write bytes in the same block, within pc-relative reach of the code (0n when none). */
  readonly data: bigint;
  readonly dataSize: number;
  readonly block: PoolBlock;
}

/** Bump allocation with a free list of exact sizes: slots come in few sizes. */
interface Arena {
  used: number;
  readonly size: number;
  readonly free: { offset: number; size: number }[];
}

interface PoolBlock extends CodeBlock {
  readonly code: Arena;
  readonly dataArena: Arena;
}

/**
 * The least code a new block maps: finding room near a target reads the whole memory map, so a
 * block serves hundreds of trampolines rather than one page's worth (Windows maps 64 KiB anyway).
 */
const MIN_BLOCK = 64 * 1024;

/** Slots start on this boundary: instruction fetch likes it and arm64 needs ≥ 4. */
const SLOT_ALIGN = 16;

/**
 * How long a released slot waits before it is reused: a thread that was already inside a stub or
 * trampoline when its patch was restored has that long to leave it. Measured on the monotonic
 * clock: a fake clock (`fakeClock()`) moves `Date.now()`.
 */
const QUARANTINE_MS = 1000;

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
  readonly #quarantine: { slot: CodeSlot; since: number; busy: bigint | null }[] = [];

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
    // Where near space is too scarce for a whole block, the exact size may still fit.
    const fresh = os.allocateCode(near, reach, roundUp(Math.max(codeSize, MIN_BLOCK), os.pageSize)) ??
      (codeSize < MIN_BLOCK ? os.allocateCode(near, reach, roundUp(codeSize, os.pageSize)) : null);
    if (!fresh) return null;
    const block: PoolBlock = {
      ...fresh,
      code: { used: 0, size: fresh.size, free: [] },
      dataArena: { used: 0, size: fresh.dataSize, free: [] },
    };
    this.#blocks.push(block);
    const page = BigInt(os.pageSize);
    for (const [start, end] of [[block.address, block.data + BigInt(block.dataSize)], [block.writable, block.writable + BigInt(block.size)]] as const) {
      for (let p = start - start % page; p < end; p += page) this.#pages.add(p);
    }
    return take(block, codeSize, dataBytes);
  }

  /** Writes `bytes` at the start of `slot` (through the writable alias) and flushes them. */
  write(slot: CodeSlot, bytes: Uint8Array): void {
    if (bytes.length > slot.size) {
      throw new RedefineError("ALLOCATION_FAILED", `internal: ${bytes.length} bytes for a ${slot.size}-byte slot.`);
    }
    const { runtime, os } = this.#platform;
    runtime.view(slot.block.writable + (slot.address - slot.block.address), bytes.length).set(bytes);
    os.flushCode(slot.address, bytes.length);
  }

  /**
   * Gives a slot back; it is reused only after the quarantine, and never while the byte at `busy`
   * (a guard's flag: its replacement is running) is set.
   */
  release(slot: CodeSlot, busy: bigint | null): void {
    this.#quarantine.push({ slot, since: performance.now(), busy });
  }

  /** True when `address` lies in this pool's memory (patching it would patch ourselves). */
  contains(address: bigint): boolean {
    return this.#pages.has(address - address % BigInt(this.#platform.os.pageSize));
  }

  /** Executable bytes handed out and not given back, for the memory-per-patch measure. */
  get codeBytesInUse(): number {
    const freed = (a: Arena) => a.free.reduce((n, f) => n + f.size, 0);
    const quarantined = this.#quarantine.reduce((n, q) => n + q.slot.size, 0);
    return this.#blocks.reduce((n, b) => n + b.code.used - freed(b.code), 0) - quarantined;
  }

  #recycle(): void {
    const now = performance.now();
    const { runtime } = this.#platform;
    const ready = (q: { since: number; busy: bigint | null }) =>
      now - q.since >= QUARANTINE_MS && (q.busy === null || runtime.view(q.busy, 1)[0] === 0);
    // Oldest first; the ready ones leave in one splice (a shift each would move the whole
    // queue, tens of thousands of slots after many patches, once per slot).
    let done = 0;
    for (; done < this.#quarantine.length && ready(this.#quarantine[done]!); done++) {
      const { slot } = this.#quarantine[done]!;
      slot.block.code.free.push({ offset: Number(slot.address - slot.block.address), size: slot.size });
      if (slot.dataSize) {
        slot.block.dataArena.free.push({ offset: Number(slot.data - slot.block.data), size: slot.dataSize });
      }
    }
    if (done > 0) this.#quarantine.splice(0, done);
  }
}

function roundUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/** Whether `carve` can give `size` bytes of `arena`. */
function fits(arena: Arena, size: number): boolean {
  return size === 0 || arena.used + size <= arena.size || arena.free.some((f) => f.size === size);
}

function carve(arena: Arena, size: number): number | null {
  if (size === 0) return 0;
  const reuse = arena.free.findIndex((f) => f.size === size);
  if (reuse >= 0) return arena.free.splice(reuse, 1)[0]!.offset;
  if (arena.used + size > arena.size) return null;
  arena.used += size;
  return arena.used - size;
}

function take(block: PoolBlock, size: number, dataSize: number): CodeSlot | null {
  const code = carve(block.code, size);
  if (code === null) return null;
  const data = carve(block.dataArena, dataSize);
  if (data === null) {
    block.code.free.push({ offset: code, size });
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
}

/**
 * How bytes reach code: one call per store, a single atomic store when they are one aligned 8-byte
 * word. False when refused, and then nothing was written.
 */
type Writer = (address: bigint, bytes: Uint8Array) => boolean;

/**
 * Writes every `writes` entry into code pages as one transaction. Each write goes through the
 * kernel's forced write where the system has one (`Os.forceWrite`: no protection changes at all);
 * where it refuses, each page touched is made writable once (keeping its execute bit, since other
 * threads may be running code on it) and gets its exact original protection back at the end. The
 * code is flushed. If any step fails, bytes already written are put back, each the way it was
 * written, and every protection restored.
 */
export function writeCode(platform: Platform, writes: readonly CodeWrite[]): void {
  const { os, runtime } = platform;
  const page = BigInt(os.pageSize);
  const pages = new Map<bigint, number>();
  const pagesOf = writes.map((w) => {
    const list: bigint[] = [];
    for (let p = w.address - w.address % page; p < w.address + BigInt(w.bytes.length); p += page) list.push(p);
    return list;
  });
  let known: Mapping | null = null;
  for (const list of pagesOf) {
    for (const p of list) {
      if (pages.has(p)) continue;
      // One query answers for every page of a mapping.
      if (!known || p < known.start || p >= known.end) known = os.mappingAt(p);
      if (!known) throw new RedefineError("INVALID_ADDRESS", `${hex(p)} is not mapped: nothing was written.`);
      pages.set(p, known.protection);
    }
  }
  // One view per page, checked mapped above, serves every read and store there: a thousand writes
  // on four pages make four views, not thousands.
  const views = new Map<bigint, Uint8Array>();
  const live: Live = (address, length) => {
    const p = address - address % page;
    if (address + BigInt(length) > p + page) return runtime.view(address, length);
    let view = views.get(p);
    if (!view) views.set(p, view = runtime.view(p, os.pageSize));
    const offset = Number(address - p);
    return view.subarray(offset, offset + length);
  };
  // Pages a plain store may write: writable already, or made so below.
  const writable = new Set([...pages].filter(([, protection]) => protection & PROT_WRITE).map(([p]) => p));
  const direct: Writer = (address, bytes) => (storeBytes(live, address, bytes), true);
  const forced: Writer = (address, bytes) => os.forceWrite(address, bytes);
  const opened: ReturnType<typeof protectionRuns> = [];
  const done: { write: CodeWrite; writer: Writer; index: number }[] = [];
  // A write is flushed when any page it touches is executable.
  const flush = (indices: readonly number[]) => {
    for (const i of indices) {
      if (pagesOf[i]!.some((p) => pages.get(p)! & PROT_EXEC)) os.flushCode(writes[i]!.address, writes[i]!.bytes.length);
    }
  };
  const undo = () => {
    for (const { write, writer } of done.reverse()) store(platform, live, write, writer);
    for (const r of opened) os.protect(r.start, r.length, r.protection);
    flush(done.map((d) => d.index));
  };
  try {
    writes.forEach((w, index) => {
      const before = { ...w, bytes: live(w.address, w.bytes.length).slice() };
      const closed = pagesOf[index]!.filter((p) => !writable.has(p));
      if (closed.length > 0) {
        done.push({ write: before, writer: forced, index });
        if (store(platform, live, w, forced)) return;
        done.pop();
        for (const r of protectionRuns(new Map(closed.map((p) => [p, pages.get(p)!])), page)) {
          os.protect(r.start, r.length, r.protection | PROT_WRITE);
          opened.push(r);
        }
        for (const p of closed) writable.add(p);
      }
      done.push({ write: before, writer: direct, index });
      store(platform, live, w, direct);
    });
  } catch (error) {
    undo();
    throw error;
  }
  for (const r of opened) os.protect(r.start, r.length, r.protection);
  flush(writes.map((_, i) => i));
}

/** A live view of `length` bytes of code at `address`, whose pages `writeCode` checked. */
type Live = (address: bigint, length: number) => Uint8Array;

/** Consecutive pages of the same protection, merged: one protection change each. */
function protectionRuns(pages: Map<bigint, number>, page: bigint) {
  const runs: { start: bigint; length: number; protection: number }[] = [];
  for (const p of [...pages.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))) {
    const last = runs.at(-1);
    if (last && last.start + BigInt(last.length) === p && last.protection === pages.get(p)) {
      last.length += Number(page);
    } else {
      runs.push({ start: p, length: Number(page), protection: pages.get(p)! });
    }
  }
  return runs;
}

/**
 * Stores `bytes` at `address` with `writer`. When they fit in one aligned 8-byte word, the whole
 * word is written in one store (its other bytes unchanged), so a thread running the code sees either
 * all of the old bytes or all of the new ones. Otherwise, given a `spin`, the entry first becomes a
 * jump to itself (one word store), then the tail is written, then the head replaces the spin.
 * False when the writer refuses the first store (nothing written); a refusal after that throws,
 * and the caller's undo puts the old bytes back.
 */
function store(platform: Platform, live: Live, write: CodeWrite, writer: Writer): boolean {
  const { address, bytes, spin } = write;
  const offset = address % 8n;
  if (offset + BigInt(bytes.length) <= 8n) return storeWord(live, address, bytes, writer);
  if (!spin || offset + BigInt(spin.length) > 8n || bytes.length <= spin.length) return writer(address, bytes);
  if (!storeWord(live, address, spin, writer)) return false;
  platform.os.flushCode(address, spin.length);
  const rest = writer(address + BigInt(spin.length), bytes.subarray(spin.length)) &&
    (platform.os.flushCode(address, bytes.length), storeWord(live, address, bytes.subarray(0, spin.length), writer));
  if (!rest) {
    throw new RedefineError(
      "PROTECT_FAILED",
      `the system took the first store into the code at ${hex(address)} and refused the next: nothing is left written.`,
    );
  }
  return true;
}

/** The aligned 8-byte word holding `bytes`, its other bytes unchanged, written in one store. */
function storeWord(live: Live, address: bigint, bytes: Uint8Array, writer: Writer): boolean {
  const offset = address % 8n;
  const word = live(address - offset, 8).slice();
  word.set(bytes, Number(offset));
  return writer(address - offset, word);
}

/** Stores through the process's own mapping: an aligned 8-byte word with one atomic store. */
function storeBytes(live: Live, address: bigint, bytes: Uint8Array): void {
  const view = live(address, bytes.length);
  if (bytes.length === 8 && address % 8n === 0n) {
    const word = new DataView(bytes.buffer, bytes.byteOffset, 8).getBigInt64(0, true);
    Atomics.store(new BigInt64Array(view.buffer, view.byteOffset, 1), 0, word);
  } else {
    view.set(bytes);
  }
}
