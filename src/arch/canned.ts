/**
 * What a canned replacement is to an instruction set: native code that answers a call without
 * entering JS (a fixed value, a sequence, a fake clock), so it is safe on every thread and for
 * functions the runtime itself calls. Each architecture's `canned.ts` encodes these specs.
 *
 * Every canned replacement has a read+write data block next to its code, laid out as
 * `CANNED_DATA` says: the native call counter (incremented atomically by every call), and the
 * address of the real function the code falls back on or reads the real clock through.
 */

/** Where a result goes: the integer return register, or the vector one as a float or double. */
export type ResultRegister = "integer" | "f32" | "f64";

/** One value to return: its register and its bits (integers sign- or zero-extended to 64). */
export interface CannedValue {
  readonly register: ResultRegister;
  /** The 64-bit pattern, unsigned; an f32 in the low 32 bits. */
  readonly bits: bigint;
}

import { RedefineError } from "../errors.ts";

/** The clock functions a fake clock redefines on Linux and macOS. */
export type PosixClockFunction = "time" | "gettimeofday" | "clock_gettime";
/** The clock functions a fake clock redefines on Windows (both fill a FILETIME). */
export type WindowsClockFunction = "GetSystemTimeAsFileTime" | "GetSystemTimePreciseAsFileTime";
/** The clock functions a fake clock redefines. */
export type ClockFunction = PosixClockFunction | WindowsClockFunction;

const WINDOWS_CLOCKS: readonly ClockFunction[] = ["GetSystemTimeAsFileTime", "GetSystemTimePreciseAsFileTime"];

/** `fn` as a clock function of `os`: refuses one of another system's. */
export function clockOn(fn: ClockFunction, os: string): { windows: true } | { windows: false; fn: PosixClockFunction } {
  const windows = WINDOWS_CLOCKS.includes(fn);
  if (windows !== (os === "windows")) {
    throw new RedefineError(
      "UNSUPPORTED_PLATFORM",
      `'${fn}' is not a clock function of ${os}: fake ${
        os === "windows" ? WINDOWS_CLOCKS.join(" and ") : "time, gettimeofday and clock_gettime"
      } there.`,
    );
  }
  return windows ? { windows } : { windows, fn: fn as PosixClockFunction };
}

/** What the canned code does. */
export type CannedSpec =
  | { readonly kind: "returns"; readonly value: CannedValue }
  | { readonly kind: "sequence"; readonly values: readonly CannedValue[] }
  | {
    readonly kind: "clock";
    readonly function: ClockFunction;
    /**
     * 0: the fake time is the word at `state`. 1: it is that word plus the real clock's reading
     * (POSIX: CLOCK_MONOTONIC in ns through `clock_gettime`; Windows: the precise system time in
     * 100 ns units), so it runs at the real pace.
     */
    readonly rate: 0 | 1;
    /**
     * An aligned 8-byte word JS stores with one atomic write: nanoseconds since 1970 (POSIX) or
     * 100 ns units since 1601 (Windows), minus the real clock's reading when `rate` is 1.
     */
    readonly state: bigint;
  };

/** Offsets in a canned replacement's data block. */
export const CANNED_DATA = {
  /** u64: calls that reached the code, counted atomically. */
  calls: 0,
  /**
   * The real function: `clock_gettime`'s original (the clock code jumps there for the clocks it
   * does not fake, and reads CLOCK_MONOTONIC through it), or the precise Windows system time.
   */
  original: 8,
  size: 16,
} as const;

/** The encoded code of a spec, sized before it is placed. */
export interface CannedPlan {
  /** Bytes of code (with its literals). */
  readonly size: number;
  /** Bytes of data (`CANNED_DATA.size`). */
  readonly dataSize: number;
  /** The code placed at `at`, with its data block at `data` (within pc-relative reach). */
  encode(at: bigint, data: bigint): Uint8Array;
}

/** The clock ids a fake clock answers for, and the monotonic one it reads the pace from. */
export interface ClockIds {
  readonly realtime: readonly number[];
  readonly monotonic: number;
}

/**
 * Linux: CLOCK_REALTIME 0 and CLOCK_REALTIME_COARSE 5; CLOCK_MONOTONIC is 1. macOS numbers them
 * differently: CLOCK_REALTIME 0, CLOCK_MONOTONIC 6, and 5 is CLOCK_MONOTONIC_RAW_APPROX, which
 * must not be faked.
 */
export function clockIds(os: string): ClockIds {
  return os === "darwin" ? { realtime: [0], monotonic: 6 } : { realtime: [0, 5], monotonic: 1 };
}

/** What an instruction set encodes; `cannedCodeWith` picks by the spec. */
export interface CannedEncoders {
  returns(value: CannedValue): CannedPlan;
  sequence(values: readonly CannedValue[]): CannedPlan;
  posixClock(fn: PosixClockFunction, os: string, rate: 0 | 1, state: bigint): CannedPlan;
  windowsClock(rate: 0 | 1, state: bigint): CannedPlan;
}

/** The canned code of `spec` for `os` (the clock functions differ by system), from `encoders`. */
export function cannedCodeWith(encoders: CannedEncoders, spec: CannedSpec, os: string): CannedPlan {
  switch (spec.kind) {
    case "returns":
      return encoders.returns(spec.value);
    case "sequence":
      return encoders.sequence(spec.values);
    case "clock": {
      const clock = clockOn(spec.function, os);
      return clock.windows
        ? encoders.windowsClock(spec.rate, spec.state)
        : encoders.posixClock(clock.fn, os, spec.rate, spec.state);
    }
  }
}
