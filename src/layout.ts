/**
 * Where a patch's code goes and what it holds, one function per case: a direct entry jump to a
 * native replacement in reach; a guarded stub in front of a JS replacement; a stub with an
 * absolute jump to a native replacement out of reach; and the function's own trampoline
 * (`redefineToOriginal`). Stubs share one pool slot with the trampoline (the relocated first
 * instructions), placed within reach of the shortest entry jump that has memory in its reach: near,
 * then (arm64) ±4 GiB, then anywhere, behind an absolute entry jump. A patch layered on another has
 * no trampoline of its own: its original is where the patch below leads. The original exists
 * before the entry jump can go live (a native replacement may call it from its first call on);
 * nothing is written at the entry here. A function patched again the way its last patch was laid
 * out takes that patch's slot back from quarantine, its code in place (registry.ts `SlotReuse`): a
 * test suite or a benchmark that patches and restores the same functions over and over relocates
 * and writes each one once.
 */
import { hex, RedefineError, spanText } from "./errors.ts";
import { ANYWHERE, type BranchChecks, type EntryJump, type RelocationPlan, UNCHECKED } from "./arch/types.ts";
import { guardOptions, guardShape } from "./guard_code.ts";
import { probeCode, probeRecord } from "./slot_layout.ts";
import type { CodeSlot } from "./code_memory.ts";
import type { NativeType } from "./signature.ts";
import { holdsAt, liveBytes, machine, reclaimSpare, refuseOverlap } from "./registry.ts";
import type { Entry, KnownPlan, Machine, SlotReuse } from "./registry.ts";
import { refuseJumpsIntoEntry } from "./target.ts";
import type { Site } from "./target.ts";
import type { Destination } from "./replacement.ts";
import { CANNED_DATA } from "./arch/canned.ts";
import { cannedData } from "./mock/canned.ts";
import { Trampoline } from "./patch.ts";
import type { Built } from "./patch.ts";
import { PROBE_COUNTERS, PROBE_RECORD } from "./arch/probe.ts";

type AnySite = Site<readonly NativeType[], NativeType>;

/** A patch's code, placed; what to write at the entry. */
export interface Layout {
  /** The entry jump to write. */
  readonly entry: Uint8Array;
  /** Bytes from the entry that the jump overwrites or the trampoline copies. */
  readonly covers: number;
  /** Where the entry jump leads. */
  readonly destination: bigint;
  /** The slot holding the trampoline and the stub or guard; null for a direct jump. */
  readonly stub: CodeSlot | null;
  /** What `stub` holds for the entry's next patch to take back, when that can (registry.ts `SlotReuse`). */
  readonly reuse?: SlotReuse | null | undefined;
  readonly trampoline: Trampoline;
  /** The guard's busy flag (JS replacements): set while the replacement runs. */
  readonly busy: bigint | null;
  /** Where calls that must not enter JS go (see the registry's `Entry.bypass`). */
  readonly bypass: bigint;
  /** Canned code's native call counter (a u64 in its data block). */
  readonly counter?: bigint;
  /** How many adjacent u64 counters from `counter` the count sums (a probe's two); 1 when absent. */
  readonly counters?: number;
}

/**
 * Lays out the code that sends the callers of `site` to `to`, layered on `under` (the function's
 * newest live patch), if any. Refuses, before anything is written, a native replacement that is the
 * function itself (every call would loop), and an `originalSlot` without an original to put there.
 * On failure nothing stays allocated.
 */
export function layOut(site: AnySite, to: Destination, under: Entry | null): Layout {
  const m = machine();
  const below = under?.destination ?? null;
  const layout = choose(m, site, to, below, under?.bypass ?? null);
  try {
    if (to.kind === "native" && to.address >= site.address && to.address < site.at + BigInt(layout.covers)) {
      throw new RedefineError(
        "BAD_REPLACEMENT",
        `the replacement ${hex(to.address)} is the function itself (its first ${layout.covers} bytes, ` +
          `which the entry jump overwrites): every call would loop there. Pass another function.`,
      );
    }
    if (site.originalSlot !== null) originalForSlot(layout.trampoline);
  } catch (error) {
    release(layout);
    throw error;
  }
  return layout;
}

/** Gives back what a layout holds, for a patch that never went live. */
export function release(layout: Layout): void {
  if (layout.stub) machine().pool.release(layout.stub, null);
  layout.trampoline.release();
}

function choose(m: Machine, site: AnySite, to: Destination, below: bigint | null, bypass: bigint | null): Layout {
  switch (to.kind) {
    case "probe":
      return probeStub(m, site, to.timing, below);
    case "callback":
      if (m.arch.guard) return guardedStub(m, site, to.callback.address, below, bypass);
      return directJump(m, site, to.callback.address, below) ?? jumpStub(m, site, to.callback.address, below);
    case "native":
      return directJump(m, site, to.address, below) ?? jumpStub(m, site, to.address, below);
    case "original":
      return toOriginal(m, site, below);
    case "canned":
      return cannedStub(m, site, to, below);
  }
}

/** The original for an `originalSlot`: a native replacement calls it, so it must exist. */
function originalForSlot(trampoline: Trampoline): void {
  const built = trampoline.built();
  if (built instanceof RedefineError) {
    throw new RedefineError(
      built.code,
      `${built.message} An 'originalSlot' needs the original: redefine this function without one, ` +
        `with a replacement that does not call the original.`,
      { cause: built },
    );
  }
}

/**
 * The entry jump reaches the native replacement: no stub. The original is the patch below, or is
 * relocated now into a slot of its own — before the entry jump can go live, so that building it
 * never runs while the function is half redefined (reading the memory map calls `open`, which may
 * be the function). A prologue that cannot be moved leaves no original; the patch is still made.
 */
function directJump(m: Machine, site: AnySite, to: bigint, below: bigint | null): Layout | null {
  const entry = entryJump(site, m.arch.entryJumps[0], to);
  if (!entry) return null;
  const trampoline = below !== null ? Trampoline.at(below) : new Trampoline(refused(trampolineAlone, m, site, undefined));
  return { entry, covers: entry.length, destination: to, stub: null, trampoline, busy: null, bypass: to };
}

/** What a lone trampoline's slot holds after the relocated instructions: nothing (see `SlotReuse`). */
const LONE_TRAMPOLINE = {};

function trampolineAlone(m: Machine, site: AnySite): Built {
  const { arch, pool } = m;
  const near = arch.entryJumps[0];
  const known = relocationPlan(m, site, near.size);
  const plan = known.plan;
  // `locate` refused overlaps of the shortest entry jump's bytes (`entryJumps[0]`): only a wider reach is asked again.
  if (plan.consumed > near.size) refuseOverlap(site.at, plan.consumed);
  // The code a slot holds is the same wherever the slot is (it jumps back from anywhere).
  const reuse: SlotReuse = { plan: known, holds: LONE_TRAMPOLINE, released: null };
  const again = reclaimSpare(known, LONE_TRAMPOLINE);
  if (again) return { address: again.address, slot: again, reuse };
  // Near, where the relocated code is shortest; else anywhere, as it jumps back from anywhere.
  const slot = pool.allocate(site.at, near.reach - BigInt(plan.maxSize), plan.maxSize) ??
    pool.allocate(site.at, ANYWHERE, plan.maxSize);
  if (!slot) {
    throw new RedefineError(
      "ALLOCATION_FAILED",
      `no executable memory could be mapped for the original of ${hex(site.at)}.`,
    );
  }
  try {
    pool.write(slot, arch.relocate(plan, slot.address, branchChecks(m, site)));
  } catch (error) {
    pool.release(slot, null);
    throw error;
  }
  return { address: slot.address, slot, reuse };
}

/**
 * A JS replacement: the entry jump leads to the guard, which sends the JS thread's calls to the
 * callback and every other call (other threads, re-entrant calls, the runtime's own calls) to the
 * original — so a JS replacement needs a trampoline.
 */
function guardedStub(
  m: Machine,
  site: AnySite,
  callback: bigint,
  below: bigint | null,
  belowBypass: bigint | null,
): Layout {
  const shape = guardShape(m, site.signature);
  // A calling guard's code is the same for every patch of the entry (its record, in the data, is
  // the patch's own): it can be taken back. A swapping guard's holds the callback.
  const stub = shape.shared
    ? reserveAgain(m, site, below, shape.size, shape.dataSize, shape)
    : reserve(m, site, below, shape.size, shape.dataSize);
  return filling(m, stub, () => {
    const { code: relocated, trampoline } = relocateInto(m, site, stub, below);
    // Past every JS layer below: a call that must not run JS (V8's own getpid while it collects
    // garbage, say) must not enter the replacement of the patch below either.
    const bypass = belowBypass ?? originalForGuard(trampoline);
    // A slot taken back holds the code: only its data is written.
    const guard = guardOptions(m, site.signature, shape, stub.slot, stub.front, callback, bypass);
    if (!stub.reused) write(m, stub, relocated, m.arch.guard!.encode(guard));
    return { ...throughStub(site, stub, trampoline, stub.slot.data + BigInt(shape.busyOffset)), bypass, reuse: stub.reuse };
  });
}

function originalForGuard(trampoline: Trampoline): bigint {
  try {
    return trampoline.address;
  } catch (error) {
    if (!(error instanceof RedefineError)) throw error;
    throw new RedefineError(
      error.code,
      `${error.message} A JS replacement needs the original for calls from other threads: ` +
        `use a native replacement for this function.`,
      { cause: error },
    );
  }
}

/**
 * A native replacement out of the entry jump's reach: the entry jump leads to an absolute jump
 * there, placed after the trampoline. An original that cannot be relocated is refused only when
 * asked for.
 */
function jumpStub(m: Machine, site: AnySite, to: bigint, below: bigint | null): Layout {
  const stub = reserve(m, site, below, absolute(m).size, 0);
  return filling(m, stub, () => {
    const { code: relocated, trampoline } = relocateInto(m, site, stub, below);
    write(m, stub, relocated, absolute(m).encode(stub.front, to)!);
    return throughStub(site, stub, trampoline, null);
  });
}

/**
 * Canned native code (returns, sequence, a fake clock's function): placed after the trampoline in
 * a slot near the entry, with its data block (`cannedData`); the entry jump leads straight to it.
 */
function cannedStub(m: Machine, site: AnySite, to: Destination & { kind: "canned" }, below: bigint | null): Layout {
  const plan = m.arch.canned!(to.spec, m.platform.runtime.os);
  const stub = reserve(m, site, below, plan.size, plan.dataSize);
  return filling(m, stub, () => {
    const { code: relocated, trampoline } = relocateInto(m, site, stub, below);
    liveBytes(stub.slot.data, plan.dataSize).set(cannedData(to, () => trampoline.address));
    write(m, stub, relocated, plan.encode(stub.front, stub.slot.data));
    return { ...throughStub(site, stub, trampoline, null), counter: stub.slot.data + BigInt(CANNED_DATA.calls) };
  });
}

/**
 * The function redirected to its own trampoline (or, layered, to the patch below): every call runs
 * the relocated first instructions and jumps back. The entry jump leads straight there when it
 * reaches (the trampoline is in its reach; the patch below may not be), else through an absolute
 * jump after the trampoline.
 */
function toOriginal(m: Machine, site: AnySite, below: bigint | null): Layout {
  // Its code is the same for every such patch of the entry: it can be taken back.
  const stub = reserveAgain(m, site, below, absolute(m).size, 0, TO_ORIGINAL);
  return filling(m, stub, () => {
    const { code: relocated, trampoline } = relocateInto(m, site, stub, below);
    const original = trampoline.address;
    const straight = entryJump(site, stub.jump, original);
    if (!straight) {
      write(m, stub, relocated, absolute(m).encode(stub.front, original)!);
      return { ...throughStub(site, stub, trampoline, null), reuse: stub.reuse };
    }
    write(m, stub, relocated, NO_CODE);
    return {
      entry: straight,
      covers: coverage(straight, stub),
      destination: original,
      stub: stub.slot,
      reuse: stub.reuse,
      trampoline,
      busy: null,
      bypass: original,
    };
  });
}

/**
 * The native probe: placed after the trampoline in a slot near the entry, its record in the slot's
 * data, which tells where the original is. The record's counters are the patch's `counter`. Its
 * timing slot is the busy flag: while a timed call runs, its return address points into this code.
 * The probe has room for a second copy of the trampoline's code, to run into it (`inline`).
 */
function probeStub(m: Machine, site: AnySite, timing: boolean, below: bigint | null): Layout {
  const probe = probeCode(m);
  const { os } = m.platform.runtime;
  const stub = reserve(m, site, below, (plan) => probe.size(timing, os) + sizeOf(plan), PROBE_RECORD.size);
  return filling(m, stub, () => {
    const { code: relocated, trampoline, checks } = relocateInto(m, site, stub, below);
    probeRecord(m, stub.slot.data, trampoline.address);
    const plan = stub.plan;
    const inline = checks && plan && !(plan instanceof RedefineError)
      ? (at: bigint) => m.arch.relocate(plan, at, checks)
      : undefined;
    const data = stub.slot.data;
    const code = probe.encode({ at: stub.front, data, original: trampoline.address, inline, timing, os });
    write(m, stub, relocated, code);
    const busy = stub.slot.data + BigInt(PROBE_RECORD.timer);
    const counter = stub.slot.data + BigInt(PROBE_RECORD.calls);
    return { ...throughStub(site, stub, trampoline, busy), counter, counters: PROBE_COUNTERS };
  });
}

/** No code, shared: nothing writes into it, and under Deno each fresh array costs ~0.2 µs. */
const NO_CODE = new Uint8Array(0);

/** How the first instructions move to a stub's slot; null when layered, or why they cannot. */
type Plan = RelocationPlan | RedefineError | null;

/** What a slot redirecting a function to its own trampoline holds after it (see `SlotReuse`). */
const TO_ORIGINAL = {};

/** A pool slot for a trampoline and the stub after it, and the entry jump that reaches it. */
interface Stub {
  readonly slot: CodeSlot;
  /** The form of the entry jump: the shortest with the slot in its reach. */
  readonly jump: EntryJump;
  readonly plan: Plan;
  /** Where the stub's code starts: after the trampoline. */
  readonly front: bigint;
  /** What the slot holds, for the entry's next patch (`reserveAgain`); null or absent: nothing it can take back. */
  readonly reuse?: SlotReuse | null;
  /** Taken back from the entry's last patch: its code is in place already, only data is written. */
  readonly reused?: boolean;
}

/** An entry's plan for an entry jump's size (`relocationPlan`), why its instructions cannot move, or null when layered. */
type Planned = KnownPlan | RedefineError | null;

/**
 * Reserves a slot for the trampoline and `frontSize` bytes of stub code (and `dataSize` of data)
 * within reach of the shortest entry jump that has memory in its reach and room at the entry;
 * `first` is the plan for the shortest, when the caller has it already.
 */
function reserve(
  m: Machine,
  site: AnySite,
  below: bigint | null,
  frontSize: number | ((plan: Plan) => number),
  dataSize: number,
  first?: Planned,
): Stub {
  const front = (plan: Plan) => typeof frontSize === "number" ? frontSize : frontSize(plan);
  const { arch, pool } = m;
  for (const [i, jump] of arch.entryJumps.entries()) {
    // `locate` checked the shortest jump's room and the branches into its bytes.
    if (i > 0) {
      if (site.room < jump.size) throw tooShortForStub(m, site, i);
      refuseJumpsIntoEntry(site.at, jump.size, site.place);
    }
    const planned = i === 0 && first !== undefined ? first : planFor(m, site, below, jump.size);
    const plan = planned === null || planned instanceof RedefineError ? planned : planned.plan;
    const size = sizeOf(plan) + front(plan);
    const slot = pool.allocate(site.at, jump.reach - BigInt(size), size, dataSize);
    if (slot) return { slot, jump, plan, front: slot.address + BigInt(sizeOf(plan)) };
  }
  throw new RedefineError("ALLOCATION_FAILED", "no executable memory could be mapped for a stub.");
}

/**
 * The refusal of a function with no room for the entry jump `entryJumps[next]`, the form tried
 * when no memory could be had within the reach of the one before.
 */
function tooShortForStub(m: Machine, site: AnySite, next: number): RedefineError {
  const jumps = m.arch.entryJumps;
  const forms = jumps.map((form, i) => `${form.size}${i === 0 ? " bytes" : ""} ${reachText(form.reach)}`);
  return new RedefineError(
    "FUNCTION_TOO_SHORT",
    `no memory could be had ${reachText(jumps[next - 1]!.reach)} of ${hex(site.at)} for a stub, and the ` +
      `function has only ${site.room} bytes for the entry jump, fewer than the ${jumps[next]!.size} of one ` +
      `that reaches farther (an entry jump takes ${forms.join(", ")}): redefine a caller instead.`,
  );
}

/** A reach as the messages say it: "within ±128 MiB", "anywhere". */
function reachText(reach: bigint): string {
  return reach >= ANYWHERE ? "anywhere" : `within ${spanText(reach)}`;
}

/** The entry jump that reaches anywhere, the last of the arch's forms. */
function absolute(m: Machine): EntryJump {
  return m.arch.entryJumps[m.arch.entryJumps.length - 1]!;
}

/**
 * How the CPU checks branches into the code of `site` (arm64 BTI: a trampoline beyond `b`'s reach
 * then jumps back by `ret x16`, see src/arch/aarch64/relocator.ts). No placement is needed for it:
 * every slot is taken as near as memory allows, and where none is near, none is for a trampoline.
 */
function branchChecks(m: Machine, site: AnySite): BranchChecks {
  return m.platform.os.branchChecks?.(site.at) ?? UNCHECKED;
}

/**
 * `reserve`, for a stub whose code `holds` names: the same for every patch of the entry laid out
 * this way. The slot of the entry's last such patch is taken back while it waits in quarantine,
 * its code in place; a fresh slot says what it holds for the next one.
 */
function reserveAgain(
  m: Machine,
  site: AnySite,
  below: bigint | null,
  frontSize: number,
  dataSize: number,
  holds: object,
): Stub {
  const jump = m.arch.entryJumps[0];
  const planned = planFor(m, site, below, jump.size);
  const known = planned instanceof RedefineError ? null : planned;
  const again = known ? reclaimSpare(known, holds) : null;
  if (again) {
    const reuse = { plan: known!, holds, released: null };
    const front = again.address + BigInt(sizeOf(known!.plan));
    return { slot: again, jump, plan: known!.plan, front, reuse, reused: true };
  }
  const stub = reserve(m, site, below, frontSize, dataSize, planned);
  // Only a slot in the shortest jump's reach (the one nearly every patch gets) is kept to take
  // back. One farther away was placed there because no memory was nearer: taken back, it would
  // keep the function on the longer, slower entry jump after nearer memory has come free, and it
  // would need the checks `reserve` makes for that form (the function's room, branches into
  // those bytes) again.
  const reuse = known && stub.jump === jump ? { plan: known, holds, released: null } : null;
  return { ...stub, reuse, reused: false };
}

/** How the first instructions move for an entry jump of `jumpSize` bytes; why not; null when layered. */
function planFor(m: Machine, site: AnySite, below: bigint | null, jumpSize: number): Planned {
  return below === null ? refused(relocationPlan, m, site, jumpSize) : null;
}

/**
 * What `make(a, b, c)` returns, or the RedefineError it throws: a refusal kept to tell later (any
 * other error goes on). Given the arguments, not a closure: no function is made for each patch.
 */
function refused<A, B, C, T>(make: (a: A, b: B, c: C) => T, a: A, b: B, c: C): T | RedefineError {
  try {
    return make(a, b, c);
  } catch (error) {
    if (!(error instanceof RedefineError)) throw error;
    return error;
  }
}

/**
 * How the first instructions of `site` move to free `minLength` bytes: decoded and checked once
 * per entry, then reused while the entry's bytes are the ones it moves (compared each time). What
 * follows them in the function, which the checks read for branches back into them, is taken to
 * stay as it was while the same memory stays mapped, as the code before the entry is
 * (`KnownPlace.clean`): code does not change under us, and our own patches are read through.
 */
function relocationPlan(m: Machine, site: AnySite, minLength: number): KnownPlan {
  const known = site.place.plan;
  const same = known?.minLength === minLength && known.extent === site.code.length;
  if (same && holdsAt(site.code, 0, known.moved)) return known;
  const plan = m.arch.planRelocation(site.code, site.at, minLength);
  const moved = new Uint8Array(plan.consumed);
  moved.set(site.code.subarray(0, plan.consumed));
  const fresh: KnownPlan = { minLength, extent: site.code.length, moved, plan, spare: null };
  site.place.plan = fresh;
  return fresh;
}

/** The trampoline's room at the start of a stub's slot. */
function sizeOf(plan: Plan): number {
  return plan === null || plan instanceof RedefineError ? 0 : Math.ceil(plan.maxSize / 16) * 16;
}

/**
 * The trampoline's code for the start of the stub's slot, and the trampoline (or why there is
 * none); when it was relocated here, how the CPU checks its jumps back into the function.
 */
function relocateInto(
  m: Machine,
  site: AnySite,
  stub: Stub,
  below: bigint | null,
): { code: Uint8Array; trampoline: Trampoline; checks: BranchChecks | null } {
  if (below !== null) return { code: NO_CODE, trampoline: Trampoline.at(below), checks: null };
  if (stub.plan instanceof RedefineError) return { code: NO_CODE, trampoline: new Trampoline(stub.plan), checks: null };
  // Its trampoline relocated there by the entry's last patch, as it would be now.
  if (stub.reused) return { code: NO_CODE, trampoline: Trampoline.at(stub.slot.address), checks: null };
  // Planned: there is no patch below. Asked once a stub: on a CPU with BTI each ask is a dladdr.
  const plan = stub.plan!;
  const checks = branchChecks(m, site);
  const code = refused(m.arch.relocate, plan, stub.slot.address, checks);
  if (code instanceof RedefineError) return { code: NO_CODE, trampoline: new Trampoline(code), checks: null };
  return { code, trampoline: Trampoline.at(stub.slot.address), checks };
}

/** Writes the trampoline's code and the stub's into the stub's slot (a slot taken back holds them). */
function write(m: Machine, stub: Stub, trampoline: Uint8Array, front: Uint8Array): void {
  if (stub.reused) return;
  const offset = Number(stub.front - stub.slot.address);
  const bytes = new Uint8Array(offset + front.length);
  bytes.set(trampoline, 0);
  bytes.set(front, offset);
  if (bytes.length) m.pool.write(stub.slot, bytes);
}

/** Runs `fill`, giving the stub's slot back if it fails. */
function filling(m: Machine, stub: Stub, fill: () => Layout): Layout {
  try {
    return fill();
  } catch (error) {
    m.pool.release(stub.slot, null);
    throw error;
  }
}

/** The layout of a patch whose entry jump leads to the code at the stub's front. */
function throughStub(site: AnySite, stub: Stub, trampoline: Trampoline, busy: bigint | null): Layout {
  // The jump surely reaches: the slot was allocated within its reach.
  const entry = entryJump(site, stub.jump, stub.front)!;
  const destination = stub.front;
  return { entry, covers: coverage(entry, stub), destination, stub: stub.slot, trampoline, busy, bypass: destination };
}

/**
 * `jump.encode(site.at, to)`, kept for the place (`KnownPlace.jump`): a function patched again the
 * same way gets the same bytes, which nothing writes to, instead of a fresh array.
 */
function entryJump(site: AnySite, jump: EntryJump, to: bigint): Uint8Array | null {
  const last = site.place.jump;
  if (last?.to === to && last.jump === jump) return last.bytes;
  const bytes = jump.encode(site.at, to);
  if (bytes) site.place.jump = { jump, to, bytes };
  return bytes;
}

/** Bytes from the entry that the entry jump overwrites or the trampoline copies. */
function coverage(entry: Uint8Array, stub: Stub): number {
  const plan = stub.plan;
  return plan && !(plan instanceof RedefineError) ? Math.max(entry.length, plan.consumed) : entry.length;
}
