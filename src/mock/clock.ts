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
import type { ClockFunction } from "../arch/canned.ts";
import { clockIds } from "../arch/canned.ts";
import type { NativeType } from "../signature.ts";
import { machine } from "../registry.ts";
import { apply } from "../redefine.ts";
import { transaction } from "../transaction.ts";
import { callerNames, redefineCallers } from "../import_slots.ts";
import { imports } from "../introspect.ts";
import type { Runtime } from "../../platform/mod.ts";
import { ANYWHERE } from "../arch/types.ts";

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
 * import { fakeClock } from "@redefine/redefine";
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

/**
 * Options of `fakeClock()`.
 *
 * @example
 * ```ts
 * import type { FakeClockOptions } from "@redefine/redefine";
 * const options: FakeClockOptions = { at: new Date("2001-09-09T01:46:40Z"), rate: 1 };
 * ```
 */
export interface FakeClockOptions {
  /** The fake time to start from: a `Date`, or milliseconds since 1970; default: now. */
  readonly at?: Date | number;
  /** 0 (the default): the clock stays at `at` until set or advanced; 1: it runs on from `at` at the real pace. */
  readonly rate?: number;
  /**
   * Only the calls these libraries make through their import tables see the fake time (file names
   * as the loader lists them, e.g. `"libsqlite3.so.0"`, or paths); default: the whole process.
   */
  readonly callers?: string | readonly string[];
}

/** A clock function: its name and signature. */
interface ClockTarget {
  readonly function: ClockFunction;
  readonly parameters: readonly NativeType[];
  readonly result: NativeType;
}

/**
 * The clock functions of each system, the first being the real clock the others read at rate 1
 * (through the first one's original, once it is redefined too).
 */
const CLOCKS: Readonly<Record<"posix" | "windows", readonly ClockTarget[]>> = {
  posix: [
    { function: "clock_gettime", parameters: ["i32", "pointer"], result: "i32" },
    { function: "time", parameters: ["pointer"], result: "i64" },
    { function: "gettimeofday", parameters: ["pointer", "pointer"], result: "i32" },
  ],
  windows: [
    { function: "GetSystemTimePreciseAsFileTime", parameters: ["pointer"], result: "void" },
    { function: "GetSystemTimeAsFileTime", parameters: ["pointer"], result: "void" },
  ],
};

/**
 * Fakes the time of day, natively: `clock_gettime` (for CLOCK_REALTIME and CLOCK_REALTIME_COARSE
 * only — every other clock, the monotonic ones that drive the runtime's timers among them, stays
 * real), `time` and `gettimeofday`; on Windows `GetSystemTimeAsFileTime` and
 * `GetSystemTimePreciseAsFileTime`. For the whole process, or with `callers` only for the calls
 * those libraries make through their import tables (of the functions each imports; NOT_IMPORTED
 * when they import none). All are redefined in one transaction (all or none), by machine code that
 * reads the fake time from one word of memory: no JS runs when they are called, so any thread may
 * call them. The time is frozen at `at` (default: now) unless `rate` is 1.
 *
 * @example
 * ```ts
 * import { fakeClock } from "@redefine/redefine";
 * using clock = fakeClock({ at: Date.UTC(2001, 8, 9, 1, 46, 40) });
 * // time(NULL) returns 1000000000 for every native caller now
 * clock.advance(86_400_000); // and 1000086400 from here on
 * ```
 */
export function fakeClock(options: FakeClockOptions = {}): FakeClock {
  return fakeClockOf(undefined, options);
}

/**
 * `fakeClock()` over only the clock functions named in `only` (all when undefined): for the tests,
 * on systems where some of them cannot be redefined process-wide.
 */
export function fakeClockOf(only: readonly ClockFunction[] | undefined, options: FakeClockOptions = {}): FakeClock {
  const rate = options.rate ?? 0;
  if (rate !== 0 && rate !== 1) {
    throw new RedefineError(
      "BAD_REPLACEMENT",
      `fakeClock(): rate is ${String(rate)}; it must be 0 (frozen at 'at') or 1 (running from 'at' at the real pace).`,
    );
  }
  const at = toMs(options.at ?? Date.now(), "fakeClock() 'at'");
  const m = machine();
  const { os: system, runtime } = m.platform;
  const windows = runtime.os === "windows";
  const all = CLOCKS[windows ? "windows" : "posix"];
  const reference = all[0]!;
  // Each clock function with the callers that import it (all of the process: undefined).
  const callers = options.callers === undefined ? undefined : callerNames(options.callers);
  const chosen = all
    .filter((clock) => only === undefined || only.includes(clock.function))
    .map((clock) => ({ clock, importers: callers?.filter((name) => imports(name).some((i) => i.name === clock.function)) }))
    .filter(({ importers }) => importers === undefined || importers.length > 0);
  if (callers && chosen.length === 0) {
    throw new RedefineError(
      "NOT_IMPORTED",
      `fakeClock(): ${callers.map((name) => `'${name}'`).join(", ")} import none of ` +
        `${all.map((c) => c.function).join(", ")}, so they do not read the time through the loader: ` +
        `fake the clock for the whole process (no 'callers'), or name the libraries that read it.`,
    );
  }
  // The state word, then scratch for reading the real clock from JS.
  const cell = m.pool.allocate(0n, ANYWHERE, 16, 32);
  if (!cell) throw new RedefineError("ALLOCATION_FAILED", "no memory for the fake clock's state.");
  const state = cell.data;
  let released = false;
  const release = () => {
    if (!released) m.pool.release(cell, null);
    released = true;
  };
  // Made inside an enclosing transaction that fails later, the clock never goes live.
  m.batch?.rollbacks.push(release);
  // The real clock: the reference's original once it is redefined, the function itself if it is not.
  let realClock = chosen[0]?.clock === reference ? undefined : system.symbolAddress(reference.function);
  try {
    return transaction(() => {
      const patches = chosen.map(({ clock, importers }) => {
        const target = { symbol: clock.function, parameters: clock.parameters, result: clock.result };
        const spec = { kind: "clock", function: clock.function, rate, state } as const;
        const to = { kind: "canned", spec, realClock } as const;
        const patch = importers ? redefineCallers({ ...target, callers: importers }, () => to) : apply(target, to);
        if (clock === reference && rate === 1) realClock = patch.originalAddress;
        return patch;
      });
      // Made before the transaction writes the patches: the state word holds the fake time first.
      return new FakeClock({
        state: stateWords(runtime, state).subarray(0, 1),
        real: rate === 1 ? realClockReader(runtime, realClock!, state) : () => 0n,
        units: windows ? WINDOWS_UNITS : POSIX_UNITS,
        restore: () => {
          transaction(() => {
            for (const patch of [...patches].reverse()) patch.restore();
          });
          // Inside an enclosing transaction the patches go when it commits; the state word after them.
          if (m.batch) m.batch.commits.push(release);
          else release();
        },
      }, rate, at);
    });
  } catch (error) {
    release();
    throw error;
  }
}

/** The fake clock's four words: the state, then scratch for reading the real clock. */
function stateWords(runtime: Runtime, state: bigint): BigInt64Array {
  const view = runtime.view(state, 32);
  return new BigInt64Array(view.buffer, view.byteOffset, 4);
}

/**
 * The real clock read from JS as the native code reads it at rate 1, through `address`: POSIX
 * CLOCK_MONOTONIC in ns through `clock_gettime`, Windows FILETIME through
 * `GetSystemTimePreciseAsFileTime`, into the scratch words after the state.
 */
function realClockReader(runtime: Runtime, address: bigint, state: bigint): () => bigint {
  const scratch = state + 16n;
  if (runtime.os === "windows") {
    const read = runtime.fnPointer(address, { parameters: ["pointer"], result: "void" });
    return () => {
      read(scratch);
      return stateWords(runtime, state)[2]!;
    };
  }
  const read = runtime.fnPointer(address, { parameters: ["i32", "pointer"], result: "i32" });
  const monotonic = clockIds(runtime.os).monotonic;
  return () => {
    read(monotonic, scratch);
    const [, , sec, nsec] = stateWords(runtime, state);
    return sec! * 1_000_000_000n + nsec!;
  };
}
