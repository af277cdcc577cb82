/**
 * The fake clock's JS side: `FakeClock` keeps the one word the native clock code reads
 * (src/arch/canned.ts, `kind: "clock"`) and updates it with single atomic stores, so threads
 * reading the clock meanwhile see the old time or the new one, never a mix.
 *
 * The word holds the fake time in the native clock's units (POSIX: nanoseconds since 1970;
 * Windows: 100 ns units since 1601). Frozen (rate 0) it is the time itself; running (rate 1) it is
 * the fake time minus the real clock's reading (POSIX: CLOCK_MONOTONIC; Windows: the precise system
 * time), and the native code adds the real clock back on every call.
 */
import { RedefineError } from "../errors.ts";

/** What a fake clock works with: the word the native code reads, and the clock it runs on. */
export interface ClockBackend {
  /** The state word: one aligned 64-bit word of native memory, stored atomically. */
  readonly state: BigInt64Array;
  /** The real clock the native code adds at rate 1, in the state's units, read as the code reads it. */
  readonly real: () => bigint;
  /** The state's units in a millisecond, and milliseconds from the state's epoch to 1970. */
  readonly units: { readonly perMs: bigint; readonly epochMs: bigint };
  /** Restores the clock functions (all or none) and frees the state word. */
  readonly restore: () => void;
}

/** POSIX units: nanoseconds since 1970. */
export const POSIX_UNITS = { perMs: 1_000_000n, epochMs: 0n } as const;
/** Windows units: FILETIME, 100 ns since 1601-01-01. */
export const WINDOWS_UNITS = { perMs: 10_000n, epochMs: 11_644_473_600_000n } as const;

/** The latest time a fake clock takes: 2^63 - 1 ns after 1970 (2262-04-11). */
const LATEST_MS = 9_223_372_036_854;

/**
 * A fake clock: the clock functions of the process (or of the libraries named as its `callers`)
 * report its time until `restore()`. Made by `fakeClock()`.
 *
 * @example
 * ```ts
 * import { fakeClock } from "./mod.ts";
 * using clock = fakeClock({ at: Date.UTC(2001, 8, 9, 1, 46, 40) });
 * clock.now(); // 1000000000000
 * clock.advance(86_400_000); // one day later
 * clock.set(new Date("2030-01-01T00:00:00Z"));
 * ```
 */
export class FakeClock {
  /** 0: frozen at the time set; 1: running at the real pace from it. */
  readonly rate: 0 | 1;
  readonly #backend: ClockBackend;
  #active = true;

  /** @internal Made by `fakeClock()`, which has redefined the clock functions. */
  constructor(backend: ClockBackend, rate: 0 | 1, at: Date | number) {
    this.#backend = backend;
    this.rate = rate;
    this.#store(toMs(at, "at"));
  }

  /** True until `restore()`. */
  get active(): boolean {
    return this.#active;
  }

  /** The fake time, in milliseconds since 1970 (as `Date.now()` counts). */
  now(): number {
    const { perMs, epochMs } = this.#live("now").units;
    return Number(this.#units() / perMs - epochMs);
  }

  /** Sets the fake time: a `Date`, or milliseconds since 1970. */
  set(at: Date | number): void {
    this.#live("set");
    this.#store(toMs(at, "set()"));
  }

  /** Moves the fake time by `ms` milliseconds (negative: back), in one atomic step. */
  advance(ms: number): void {
    const { state, units } = this.#live("advance");
    if (!Number.isFinite(ms)) {
      throw new RedefineError("BAD_REPLACEMENT", `advance() takes a finite number of milliseconds, not ${ms}.`);
    }
    const delta = fromMs(ms, units.perMs);
    const next = this.#units() + delta;
    const latest = (BigInt(LATEST_MS) + units.epochMs) * units.perMs;
    if (next < units.epochMs * units.perMs || next > latest) {
      throw new RedefineError(
        "BAD_REPLACEMENT",
        `advance(${ms}) would move the fake clock outside 1970 to 2262, which the clock functions can report.`,
      );
    }
    Atomics.add(state, 0, delta);
  }

  /** Gives the clock functions back their real time, exactly as they were. A second call does nothing. */
  restore(): void {
    if (!this.#active) return;
    this.#backend.restore();
    this.#active = false;
  }

  /** Restores at the end of a `using` scope. */
  [Symbol.dispose](): void {
    this.restore();
  }

  #live(what: string): ClockBackend {
    if (!this.#active) {
      throw new RedefineError("RESTORED", `${what}(): this fake clock was restored; make a new one with fakeClock().`);
    }
    return this.#backend;
  }

  /** The fake time in the state's units, as the native code computes it now. */
  #units(): bigint {
    const { state, real } = this.#backend;
    const word = Atomics.load(state, 0);
    return this.rate === 0 ? word : word + real();
  }

  #store(ms: number): void {
    const { state, real, units } = this.#backend;
    const at = fromMs(ms, units.perMs) + units.epochMs * units.perMs;
    Atomics.store(state, 0, this.rate === 0 ? at : at - real());
  }
}

/** `ms` milliseconds in units of `perMs` to the millisecond, exact for whole milliseconds. */
function fromMs(ms: number, perMs: bigint): bigint {
  const whole = Math.trunc(ms);
  return BigInt(whole) * perMs + BigInt(Math.round((ms - whole) * Number(perMs)));
}

/** A time given as a Date or milliseconds since 1970, checked to be one the clock functions can report. */
export function toMs(at: Date | number, what: string): number {
  const ms = at instanceof Date ? at.getTime() : at;
  if (typeof ms !== "number" || !Number.isFinite(ms) || ms < 0 || ms > LATEST_MS) {
    throw new RedefineError(
      "BAD_REPLACEMENT",
      `${what}: ${String(at)} is not a time from 1970 to 2262 (a Date, or milliseconds since 1970 as Date.now() gives).`,
    );
  }
  return ms;
}
