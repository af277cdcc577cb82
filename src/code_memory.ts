/**
 * Writing code: the executable pool where stubs and trampolines live, and the all-or-nothing
 * transaction that writes into protected code (make the pages writable, write, put the original
 * protection back, flush), undoing every step when one fails.
 */
import { hex, RedefineError } from "./errors.ts";
import type { CodeBlock, Platform, Runtime } from "../platform/mod.ts";
import { PROT_EXEC, PROT_WRITE } from "../platform/mod.ts";

/** A piece of a code block handed to one patch. */
export interface CodeSlot {
  readonly address: bigint;
  readonly size: number;
  readonly block: PoolBlock;
}

interface PoolBlock extends CodeBlock {
  used: number;
  readonly free: { offset: number; size: number }[];
}

/** Slots start on this boundary: instruction fetch likes it and arm64 needs ≥ 4. */
const SLOT_ALIGN = 16;

/** Executable memory shared by many patches: one page serves many stubs. */
export class CodePool {
  readonly #platform: Platform;
  readonly #blocks: PoolBlock[] = [];

  constructor(platform: Platform) {
    this.#platform = platform;
  }

  /** A slot of `size` bytes whose every byte is within `reach` of `near`, or null. */
  allocate(near: bigint, reach: bigint, size: number): CodeSlot | null {
    const rounded = Math.ceil(size / SLOT_ALIGN) * SLOT_ALIGN;
    const within = (b: PoolBlock) => {
      const lo = b.address, hi = b.address + BigInt(b.size);
      return (lo > near ? lo - near : near - lo) <= reach && (hi > near ? hi - near : near - hi) <= reach;
    };
    for (const block of this.#blocks.filter(within)) {
      const slot = take(block, rounded);
      if (slot) return slot;
    }
    const { os } = this.#platform;
    const blockSize = Math.ceil(rounded / os.pageSize) * os.pageSize;
    const fresh = os.allocateCode(near, reach, blockSize);
    if (!fresh) return null;
    const block: PoolBlock = { ...fresh, used: 0, free: [] };
    this.#blocks.push(block);
    return take(block, rounded);
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

  /** Gives a slot back for reuse. */
  release(slot: CodeSlot): void {
    const block = slot.block;
    block.free.push({ offset: Number(slot.address - block.address), size: slot.size });
  }

  /** True when `address` lies in this pool's memory (patching it would patch ourselves). */
  contains(address: bigint): boolean {
    return this.#blocks.some((b) =>
      (address >= b.address && address < b.address + BigInt(b.size)) ||
      (address >= b.writable && address < b.writable + BigInt(b.size))
    );
  }
}

function take(block: PoolBlock, size: number): CodeSlot | null {
  const reuse = block.free.findIndex((f) => f.size === size);
  if (reuse >= 0) {
    const [f] = block.free.splice(reuse, 1);
    return { address: block.address + BigInt(f.offset), size, block };
  }
  if (block.used + size > block.size) return null;
  const slot = { address: block.address + BigInt(block.used), size, block };
  block.used += size;
  return slot;
}

/** One write into protected code. */
export interface CodeWrite {
  readonly address: bigint;
  readonly bytes: Uint8Array;
}

/**
 * Writes every `writes` entry into code pages as one transaction: each page touched is made
 * writable once (keeping its execute bit, since other threads may be running code on it), every
 * write is done, each page gets its exact original protection back, and the code is flushed.
 * If any step fails, bytes already written are put back and every protection restored.
 */
export function writeCode(platform: Platform, writes: readonly CodeWrite[]): void {
  const { os, runtime } = platform;
  const page = BigInt(os.pageSize);
  const pages = new Map<bigint, number>();
  for (const { address, bytes } of writes) {
    const first = address - address % page;
    for (let p = first; p < address + BigInt(bytes.length); p += page) {
      const mapping = os.mappingAt(p);
      if (!mapping) {
        throw new RedefineError("INVALID_ADDRESS", `${hex(p)} is not mapped: nothing was written.`);
      }
      pages.set(p, mapping.protection);
    }
  }
  const opened: [bigint, number][] = [];
  const done: CodeWrite[] = [];
  const undo = () => {
    for (const w of done.reverse()) store(runtime, w.address, w.bytes);
    for (const [p, protection] of opened) os.protect(p, os.pageSize, protection);
  };
  try {
    for (const [p, protection] of pages) {
      if (!(protection & PROT_WRITE)) {
        os.protect(p, os.pageSize, protection | PROT_WRITE);
        opened.push([p, protection]);
      }
    }
    for (const w of writes) {
      done.push({ address: w.address, bytes: runtime.view(w.address, w.bytes.length).slice() });
      store(runtime, w.address, w.bytes);
    }
  } catch (error) {
    undo();
    throw error;
  }
  for (const [p, protection] of opened) os.protect(p, os.pageSize, protection);
  for (const w of writes) {
    if (pages.get(w.address - w.address % page)! & PROT_EXEC) os.flushCode(w.address, w.bytes.length);
  }
}

/**
 * Stores `bytes` at `address` through `view`. When they fit in one aligned 8-byte word, the word is
 * written with a single atomic store (its other bytes unchanged), so a thread running the code sees
 * either all of the old bytes or all of the new ones.
 */
function store(runtime: Runtime, address: bigint, bytes: Uint8Array): void {
  const offset = address % 8n;
  if (offset + BigInt(bytes.length) > 8n) {
    runtime.view(address, bytes.length).set(bytes);
    return;
  }
  const live = runtime.view(address - offset, 8);
  const word = live.slice();
  word.set(bytes, Number(offset));
  Atomics.store(new BigInt64Array(live.buffer, live.byteOffset, 1), 0, new BigInt64Array(word.buffer)[0]);
}
