/**
 * The arm64 instruction-cache flush this library writes itself, for when `__clear_cache` cannot be
 * had (libgcc_s exports it; glibc does not). AArch64 instruction fetch is not coherent with data
 * writes: code written as data must be cleaned from the data cache to the point of unification
 * (`dc cvau`), then invalidated in the instruction cache (`ic ivau`), each line of the range, with
 * barriers, before any thread may run it. Line sizes come from `ctr_el0`, which Linux lets user
 * space read (or emulates when a CPU erratum asks it to trap).
 */
import { RedefineError } from "../src/errors.ts";
import type { NativeCall, Runtime } from "./types.ts";

/**
 * `flush(start, end)`: makes the code in `[start, end)` visible to instruction fetch on every core.
 * It follows libgcc's `__aarch64_sync_cache_range` and honours `ctr_el0`'s IDC and DIC bits
 * (cores whose caches need no clean, or no invalidation, for coherence). Uses x0–x4 only.
 */
export const FLUSH_ROUTINE: readonly number[] = [
  0xd53b0022, //    mrs   x2, ctr_el0
  0x37e00142, //    tbnz  w2, #28, dsb1: IDC, the data side needs no clean
  0xd3504c43, //    ubfx  x3, x2, #16, #4: DminLine, log2 of the smallest data line in words
  0xd2800084, //    mov   x4, #4
  0x9ac32083, //    lsl   x3, x4, x3: data line bytes
  0xd1000464, //    sub   x4, x3, #1
  0x8a240004, //    bic   x4, x0, x4: start, down to a line
  0xd50b7b24, // 1: dc    cvau, x4
  0x8b030084, //    add   x4, x4, x3
  0xeb01009f, //    cmp   x4, x1
  0x54ffffa3, //    b.lo  1b
  0xd5033b9f, //    dsb1: dsb ish: the cleans are done before any invalidation
  0x37e80162, //    tbnz  w2, #29, isb: DIC, the instruction side needs no invalidation
  0x92400c43, //    and   x3, x2, #0xf: IminLine
  0xd2800084, //    mov   x4, #4
  0x9ac32083, //    lsl   x3, x4, x3: instruction line bytes
  0xd1000464, //    sub   x4, x3, #1
  0x8a240004, //    bic   x4, x0, x4
  0xd50b7524, // 2: ic    ivau, x4
  0x8b030084, //    add   x4, x4, x3
  0xeb01009f, //    cmp   x4, x1
  0x54ffffa3, //    b.lo  2b
  0xd5033b9f, //    dsb   ish: the invalidations are done on every core
  0xd5033fdf, //    isb: this core refetches
  0xd65f03c0, //    ret
];

/** `FLUSH_ROUTINE` as little-endian bytes. */
export function flushRoutineBytes(): Uint8Array {
  const bytes = new Uint8Array(FLUSH_ROUTINE.length * 4);
  const view = new DataView(bytes.buffer);
  FLUSH_ROUTINE.forEach((word, i) => view.setUint32(i * 4, word, true));
  return bytes;
}

const PROT_READ = 1, PROT_WRITE = 2, PROT_EXEC = 4;
const MAP_PRIVATE = 0x02, MAP_ANONYMOUS = 0x20;
const MAP_FAILED = 2n ** 64n - 1n;

/**
 * Places the flush routine in a page of its own and returns a caller for it. The page is written
 * while read+write and only then made read+execute: the kernel makes a page coherent for
 * instruction fetch when it first maps it executable, so the routine needs no flush of its own,
 * and the page is never writable and executable at once.
 */
export function ownCacheFlush(runtime: Runtime, pageSize: number): (address: bigint, length: number) => void {
  const c = runtime.open("libc.so.6", {
    mmap: { parameters: ["usize", "usize", "i32", "i32", "i32", "i64"], result: "usize" },
    mprotect: { parameters: ["usize", "usize", "i32"], result: "i32" },
  });
  const size = BigInt(pageSize);
  const page = c.mmap(0n, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0n) as bigint;
  if (page === MAP_FAILED) {
    throw new RedefineError("ALLOCATION_FAILED", "mmap of a page for the instruction-cache flush routine failed.");
  }
  runtime.view(page, FLUSH_ROUTINE.length * 4).set(flushRoutineBytes());
  if ((c.mprotect(page, size, PROT_READ | PROT_EXEC) as number) !== 0) {
    throw new RedefineError("PROTECT_FAILED", "mprotect of the instruction-cache flush routine's page failed.");
  }
  const flush: NativeCall = runtime.fnPointer(page, { parameters: ["usize", "usize"], result: "void" });
  return (address, length) => flush(address, address + BigInt(length));
}

/**
 * The arm64 flush: libgcc's `__clear_cache` when the process can load it, else `ownCacheFlush`.
 * `libgcc` names the library (a test gives a missing one to get the fallback).
 */
export function aarch64CacheFlush(
  runtime: Runtime,
  pageSize: number,
  libgcc = "libgcc_s.so.1",
): { flush: (address: bigint, length: number) => void; source: "__clear_cache" | "own routine" } {
  let clear: NativeCall;
  try {
    // Bound as a required symbol: Bun cannot open a library for optional symbols alone.
    clear = runtime.open(libgcc, { __clear_cache: { parameters: ["usize", "usize"], result: "void" } }).__clear_cache;
  } catch (error) {
    const missing = error instanceof RedefineError &&
      (error.code === "LIBRARY_NOT_FOUND" || error.code === "SYMBOL_NOT_FOUND");
    if (!missing) throw error;
    return { flush: ownCacheFlush(runtime, pageSize), source: "own routine" };
  }
  return { flush: (address, length) => clear(address, address + BigInt(length)), source: "__clear_cache" };
}
