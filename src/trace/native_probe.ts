/**
 * Native probes: `probeNatively()` puts the counting (and timing) code of src/arch/probe.ts in
 * front of a function, as a patch like any other (layered, restored exactly), and reads its record
 * — calls, timed calls, timestamp ticks — with no JS on the function's path. `clockRate()`
 * measures the timestamp counter against `performance.now()` once, for the ticks' length.
 */
import type { AddressTarget, SymbolTarget } from "../target.ts";
import { redefine } from "../redefine.ts";
import { NATIVE_PROBE } from "../replacement.ts";
import { machine } from "../registry.ts";
import type { Patch } from "../patch.ts";
import { PROBE_RECORD } from "../arch/probe.ts";
import { RedefineError } from "../errors.ts";
import { ANYWHERE } from "../arch/types.ts";

/** What a native probe has seen so far. */
export interface ProbeReading {
  /** Calls that entered the function, on every thread. */
  readonly calls: number;
  /** Calls that were timed (see src/arch/probe.ts for which). */
  readonly timed: number;
  /** Timestamp counter ticks summed over the timed calls. */
  readonly ticks: bigint;
}

/** A function to probe: named by symbol, or by address and size; no signature is needed. */
export type ProbeTarget =
  | Omit<SymbolTarget<[], "void">, "parameters" | "result">
  | Omit<AddressTarget<[], "void">, "parameters" | "result">;

/** A live native probe. */
export interface NativeProbe {
  /** The patch carrying it. */
  readonly patch: Patch<[], "void">;
  /** The counts so far (the last ones, once restored). */
  read(): ProbeReading;
  /** Takes the probe off, keeping its last counts for `read()`. */
  restore(): void;
}

/**
 * Puts a native probe in front of `target` (or, with `callers`, in the import slots of those
 * libraries): every call is counted, and when `timing`, calls are timed too. Refuses, with nothing
 * written, what `redefine()` refuses (too short, unrelocatable).
 */
export function probeNatively(target: ProbeTarget, timing: boolean): NativeProbe {
  const full = { ...target, parameters: [], result: "void" } as SymbolTarget<[], "void">;
  const patch = redefine(full, { [NATIVE_PROBE]: { timing } } as never);
  const record = patch.counterAddress!;
  let last: ProbeReading = { calls: 0, timed: 0, ticks: 0n };
  const read = (): ProbeReading => {
    // Restored (by restore(), or by someone's restoreAll()): the record is gone; the patch kept
    // the final count, the times stop at the last reading.
    if (!patch.active) return { ...last, calls: patch.calls ?? last.calls };
    const view = machine().platform.runtime.view(record, PROBE_RECORD.size);
    const words = new BigUint64Array(view.buffer, view.byteOffset, PROBE_RECORD.size / 8);
    last = {
      calls: Number(Atomics.load(words, PROBE_RECORD.calls / 8) + Atomics.load(words, PROBE_RECORD.ownCalls / 8)),
      timed: Number(Atomics.load(words, PROBE_RECORD.timed / 8)),
      ticks: Atomics.load(words, PROBE_RECORD.ticks / 8),
    };
    return last;
  };
  return {
    patch,
    read,
    restore() {
      read();
      patch.restore();
    },
  };
}

/**
 * Timestamp counter ticks per nanosecond, measured against `performance.now()` over `ms`
 * milliseconds of busy waiting (the counter's rate is constant on every processor this runs on:
 * x86-64's invariant TSC, AArch64's generic timer).
 */
export function clockRate(ms = 25): number {
  const m = machine();
  const reader = m.arch.probe?.clockReader;
  if (!reader) throw new RedefineError("UNSUPPORTED_PLATFORM", `the native probe has no ${m.arch.name} code.`);
  const slot = m.pool.allocate(0n, ANYWHERE, reader.length);
  if (!slot) throw new RedefineError("ALLOCATION_FAILED", "no executable memory for the clock reader.");
  try {
    m.pool.write(slot, reader);
    const now = m.platform.runtime.fnPointer(slot.address, { parameters: [], result: "u64" }) as () => bigint;
    const t0 = performance.now(), c0 = now();
    let t1 = t0;
    while (t1 - t0 < ms) t1 = performance.now();
    const c1 = now();
    return Number(c1 - c0) / ((t1 - t0) * 1e6);
  } finally {
    m.pool.release(slot, null);
  }
}
