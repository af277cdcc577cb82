/**
 * What a native probe is to an instruction set: code in front of a function that counts every
 * call (one atomic add, any thread) and, when it times, measures the call's duration with the
 * processor's timestamp counter by swapping the return address — with no JS on the path, so it
 * can stand in front of functions the runtime itself calls. Each architecture's `probe.ts`
 * encodes it.
 *
 * Its data block (`PROBE_RECORD`) is shared by every thread: one timing slot, taken with an atomic
 * exchange, so one call at a time is timed — the outermost call of a recursion (its inclusive
 * time, never counted twice), and, while one thread's call is being timed, the calls other threads
 * make meanwhile are counted, not timed. A timed call that never returns (longjmp out of it, a
 * thread exiting inside it) keeps the slot: later calls are still counted.
 */

/** Byte offsets of the probe's data block (each an aligned 64-bit word). */
export const PROBE_RECORD = {
  /** Calls that entered the probe, atomically incremented. */
  calls: 0,
  /** The timing slot: 0 when free, 1 while a call is being timed. */
  owner: 8,
  /** The timed call's own return address, while it runs. */
  saved: 16,
  /** The timestamp its call began at. */
  start: 24,
  /** Timestamp ticks summed over the timed calls. */
  ticks: 32,
  /** Timed calls (returned). */
  timed: 40,
  /** Where the probe continues: the original function (its trampoline). */
  original: 48,
  size: 56,
} as const;

/** A native probe's code for one instruction set. */
export interface ProbeCode {
  /** Bytes of code of a probe that counts, and times when `timing`. */
  size(timing: boolean): number;
  /** The probe's code placed at `at`, its data block at `data` (within pc-relative reach). */
  encode(at: bigint, data: bigint, timing: boolean): Uint8Array;
  /** A function of no arguments returning the timestamp counter the probe reads (u64). */
  readonly clockReader: Uint8Array;
}
