/**
 * Where import slots lead instead of the function they held (`callers`): a native replacement
 * itself, or code placed anywhere in the pool — a slot holds a whole address, so nothing is out of
 * reach and nothing needs relocating: the guard in front of a JS replacement, canned code, or the
 * native probe, each with the slots' old target as its original.
 */
import { RedefineError } from "./errors.ts";
import type { CodeSlot } from "./code_memory.ts";
import type { Signature } from "./signature.ts";
import { isolateIdentity, machine } from "./registry.ts";
import type { Machine } from "./registry.ts";
import type { Destination } from "./replacement.ts";
import { CANNED_DATA } from "./arch/canned.ts";
import { cannedData } from "./mock/canned.ts";
import { PROBE_COUNTERS, PROBE_RECORD } from "./arch/probe.ts";
import type { ProbeCode } from "./arch/probe.ts";
import { guardOptions, guardShape } from "./guard_code.ts";
import { ANYWHERE } from "./arch/types.ts";

/** What an import slot leads to instead of the function (`callers`), and the code placed for it. */
export interface SlotLayout {
  readonly destination: bigint;
  /** The guard's or the canned code's slot; null when the slot leads to the replacement itself. */
  readonly stub: CodeSlot | null;
  /** The guard's busy flag: set while the replacement runs. */
  readonly busy: bigint | null;
  /** Where calls that must not enter JS go (see the registry's `Entry.bypass`). */
  readonly bypass: bigint;
  /** Canned code's native call counter, or a native probe's record (its counters first). */
  readonly counter?: bigint;
  /** How many adjacent u64 counters from `counter` the count sums (a probe's two); 1 when absent. */
  readonly counters?: number;
}

/**
 * Lays out where import slots lead instead of `original` (what they held): a native replacement
 * itself — a slot holds a whole address, so nothing is out of reach — or, for a JS one, the guard,
 * which sends other threads' and re-entrant calls to `bypass` (`original`, or past the JS layers
 * below it). Nothing needs relocating.
 */
export function slotLayout(
  signature: Signature,
  to: Destination,
  original: bigint,
  bypass: bigint,
): SlotLayout {
  const m = machine();
  if (to.kind === "native") return { destination: to.address, stub: null, busy: null, bypass: to.address };
  if (to.kind === "original") return { destination: original, stub: null, busy: null, bypass: original };
  if (to.kind === "probe") return probeForSlots(m, to.timing, original);
  if (to.kind === "canned") return cannedAlone(m, to, original);
  const guard = m.arch.guard;
  if (!guard) return { destination: to.callback.address, stub: null, busy: null, bypass: to.callback.address };
  const shape = guardShape(m, signature);
  const slot = placed(m, original, shape.size, shape.dataSize, "the guard", (slot) => {
    m.pool.write(slot, guard.encode(guardOptions(m, signature, shape, slot, slot.address, to.callback.address, bypass)));
  });
  return { destination: slot.address, stub: slot, busy: slot.data + BigInt(shape.busyOffset), bypass };
}

/**
 * Canned code for import slots: anywhere (a slot holds a whole address), with its data block
 * (`cannedData`) whose original is what the slots held.
 */
function cannedAlone(m: Machine, to: Destination & { kind: "canned" }, original: bigint): SlotLayout {
  const plan = m.arch.canned!(to.spec, m.platform.runtime.os);
  const slot = placed(m, original, plan.size, plan.dataSize, "the canned code", (slot) => {
    m.platform.runtime.view(slot.data, plan.dataSize).set(cannedData(to, () => original));
    m.pool.write(slot, plan.encode(slot.address, slot.data));
  });
  const destination = slot.address;
  return { destination, stub: slot, busy: null, counter: slot.data + BigInt(CANNED_DATA.calls), bypass: destination };
}

/** The native probe for import slots (`callers`): anywhere, continuing to what the slots held. */
function probeForSlots(m: Machine, timing: boolean, original: bigint): SlotLayout {
  const probe = probeCode(m);
  const { os } = m.platform.runtime;
  const slot = placed(m, original, probe.size(timing, os), PROBE_RECORD.size, "the probe", (slot) => {
    probeRecord(m, slot.data, original);
    m.pool.write(slot, probe.encode({ at: slot.address, data: slot.data, original, timing, os }));
  });
  const busy = slot.data + BigInt(PROBE_RECORD.timer);
  const counter = slot.data + BigInt(PROBE_RECORD.calls);
  // No JS runs in the probe: calls that must not enter JS may go through it too.
  return { destination: slot.address, stub: slot, busy, counter, counters: PROBE_COUNTERS, bypass: slot.address };
}

export function probeCode(m: Machine): ProbeCode {
  if (!m.arch.probe) throw new RedefineError("UNSUPPORTED_PLATFORM", `the native probe has no ${m.arch.name} code.`);
  return m.arch.probe;
}

/**
 * A fresh probe record at `data` (a reused slot's data holds the last one's): zeros, `original`,
 * and this isolate's JS thread as the owner — the identity word's content, the thread as the guard
 * reads it (0 where there is no guard: then no thread is the owner, and every call counts
 * atomically).
 */
export function probeRecord(m: Machine, data: bigint, original: bigint): void {
  const record = new DataView(new ArrayBuffer(PROBE_RECORD.size));
  if (m.arch.guard) {
    const identity = m.platform.runtime.view(isolateIdentity(), 8);
    record.setBigUint64(PROBE_RECORD.thread, Atomics.load(new BigUint64Array(identity.buffer, identity.byteOffset, 1), 0), true);
  }
  record.setBigUint64(PROBE_RECORD.original, original, true);
  m.platform.runtime.view(data, PROBE_RECORD.size).set(new Uint8Array(record.buffer));
}

/** A pool slot anywhere (near `near` if it can be), filled by `fill`; given back if that fails. */
function placed(
  m: Machine,
  near: bigint,
  size: number,
  dataSize: number,
  what: string,
  fill: (slot: CodeSlot) => void,
): CodeSlot {
  const slot = m.pool.allocate(near, ANYWHERE, size, dataSize);
  if (!slot) throw new RedefineError("ALLOCATION_FAILED", `no executable memory could be mapped for ${what}.`);
  try {
    fill(slot);
  } catch (error) {
    m.pool.release(slot, null);
    throw error;
  }
  return slot;
}
