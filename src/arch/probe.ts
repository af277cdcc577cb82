/**
 * What a native probe is to an instruction set: code in front of a function that counts every
 * call and, when it times, measures the call's duration with the processor's timestamp counter by
 * swapping the return address — with no JS on the path, so it can stand in front of functions the
 * runtime itself calls. Each architecture's `probe.ts` encodes it.
 *
 * Counting is exact on every thread yet cheap on the one that matters most: the record names an
 * owner thread (the JS thread that attached, read as the guard reads the thread's identity), whose
 * calls add to a counter of their own with a plain increment — no other thread writes that word,
 * so it needs no atomic read-modify-write, which costs several times a small function's own work.
 * Calls from any other thread add to the shared counter atomically. The count is the two summed:
 * aligned words, each written by its increments alone, so any thread reads them whole.
 *
 * Its data block (`PROBE_RECORD`) is shared by every thread: one timing slot, taken with an atomic
 * exchange, so one call at a time is timed — the outermost call of a recursion (its inclusive
 * time, never counted twice), and, while one thread's call is being timed, the calls other threads
 * make meanwhile are counted, not timed. A timed call that never returns (longjmp out of it, a
 * thread exiting inside it) keeps the slot: later calls are still counted.
 */

/** Byte offsets of the probe's data block (each an aligned 64-bit word). */
export const PROBE_RECORD = {
  /** Calls from threads other than the owner, atomically incremented. */
  calls: 0,
  /** Calls from the owner thread, which alone increments it (plainly). */
  ownCalls: 8,
  /** The owner thread's identity, as the architecture's guard reads it (`threadPointerReader`). */
  thread: 16,
  /** The timing slot: 0 when free, 1 while a call is being timed. */
  timer: 24,
  /** The timed call's own return address, while it runs. */
  saved: 32,
  /** The timestamp its call began at. */
  start: 40,
  /** Timestamp ticks summed over the timed calls. */
  ticks: 48,
  /** Timed calls (returned). */
  timed: 56,
  /** Where the probe continues: the original function (its trampoline). */
  original: 64,
  size: 72,
} as const;

/** The counters whose sum is the probe's count: adjacent words from `calls`. */
export const PROBE_COUNTERS = 2;

/** Where one probe is placed and where it continues. */
export interface ProbeOptions {
  /** Where its code is placed. */
  readonly at: bigint;
  /** Its data block (`PROBE_RECORD`), within pc-relative reach of `at`. */
  readonly data: bigint;
  /**
   * The original (the record's `original` holds it too): jumped to directly when a direct jump
   * from the probe reaches it, which is cheaper than a jump through the record.
   */
  readonly original: bigint;
  /**
   * When the probe stands at a function's entry: the original's first instructions relocated to
   * run at a given address, ending in the jump back into the function (a second copy of the
   * trampoline's code). The probe runs into its own copy instead of taking one more jump to
   * `original` — a taken jump costs a small function as much as the count itself. The probe's
   * slot has room for it beyond `ProbeCode.size()`.
   */
  readonly inline?: ((address: bigint) => Uint8Array) | undefined;
  /** Whether it times calls besides counting them. */
  readonly timing: boolean;
  /** The operating system: where the thread's identity is read from. */
  readonly os: string;
}

/** A native probe's code for one instruction set. */
export interface ProbeCode {
  /** The most bytes of code of a probe that counts, and times when `timing`, on `os` (without `inline`). */
  size(timing: boolean, os: string): number;
  /** The probe's code. */
  encode(options: ProbeOptions): Uint8Array;
  /** A function of no arguments returning the timestamp counter the probe reads (u64). */
  readonly clockReader: Uint8Array;
}
