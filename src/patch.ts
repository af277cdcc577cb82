/**
 * The `Patch` handle of one live redefinition — calling the original, restoring exactly — and the
 * `Trampoline` that keeps the original callable while the entry holds the jump.
 */
import { hex, hexBytes, RedefineError } from "./errors.ts";
import type { JsArguments, JsValue, NativeType } from "./signature.ts";
import { mappedNow } from "./code_memory.ts";
import type { CodeSlot, CodeWrite } from "./code_memory.ts";
import type { OriginalStub } from "./original.ts";
import {
  exclusive, holdsAt, isForeign, joinSection, layers, layersOf, liveBytes, liveHolds, machine, mappingAt, register, releaseSlot, restoredBytes, retire,
  unregister,
} from "./registry.ts";
import type { Entry, SlotReuse } from "./registry.ts";
import { nativeSignature } from "./replacement.ts";
import { moduleAt } from "./introspect.ts";
import { pendingAt, schedule, transaction } from "./transaction.ts";
import { PROT_READ, PROT_WRITE, sameFile } from "../platform/mod.ts";
import type { Mapping, NativeCallback } from "../platform/mod.ts";

/** A trampoline's code: where it is, and the pool slot it got for itself (null: it lives in a stub's). */
export interface Built {
  readonly address: bigint;
  readonly slot: CodeSlot | null;
  /** What its own slot holds, for the entry's next patch to take back (registry.ts `SlotReuse`). */
  readonly reuse?: SlotReuse | null;
}

/**
 * The original function as native code can call it while the patch is live: the relocated first
 * instructions and a jump back into the function, or, for a patch layered on another, what the
 * patch below leads to. Built once, by the layout, before the entry jump can go live: with the
 * patch's stub, or in a slot of its own when the entry jump reaches a native replacement directly.
 * Why it cannot be built is kept and thrown to whoever asks for it.
 */
export class Trampoline {
  #built: Built | RedefineError | null;

  /** A trampoline built (by the layout), or refused for the reason given. */
  constructor(built: Built | RedefineError) {
    this.#built = built;
  }

  /** A trampoline already in place at `address`. */
  static at(address: bigint): Trampoline {
    return new Trampoline({ address, slot: null });
  }

  /** Where the trampoline is; throws why there is none (`UNRELOCATABLE`, `ALLOCATION_FAILED`). */
  get address(): bigint {
    const built = this.built();
    if (built instanceof RedefineError) throw built;
    return built.address;
  }

  /** Its code, or why there is none. */
  built(): Built | RedefineError {
    return this.#built!;
  }

  /** Gives back the slot it got for itself, once its patch is gone. */
  release(): void {
    if (this.#built && !(this.#built instanceof RedefineError) && this.#built.slot) {
      releaseSlot(this.#built.slot, null, this.#built.reuse ?? null);
    }
    this.#built = null;
  }
}

/** One place a patch writes: the function's entry jump, or (with `callers`) one import slot. */
export interface PatchWrite {
  /** What the write stacks on: the function's entry for its entry jump, the slot for a slot. */
  readonly key: bigint;
  /** Where the bytes go (the entry jump: after a landing pad). */
  readonly at: bigint;
  /** What was at `at` before: the function's bytes, the slot's pointer, or the patch below's. */
  readonly original: Uint8Array;
  /** The entry jump, or the slot's new pointer. */
  readonly written: Uint8Array;
  /** The mapping `at` was found in when the patch was made, for its writes (`CodeWrite.mapping`). */
  readonly mapping?: Mapping;
}

/** What `redefine()` hands a new patch. */
export interface Applied {
  /** Where the patch writes: all of them go live and come back together. */
  readonly writes: readonly PatchWrite[];
  /** Where the writes lead (a stub, the guard, or the replacement itself). */
  readonly destination: bigint;
  /** Trampoline, then stub or guard: null when the jump reaches the replacement directly. */
  readonly stub: CodeSlot | null;
  /** What the stub's slot holds, for the entry's next patch to take back (registry.ts `SlotReuse`). */
  readonly reuse?: SlotReuse | null | undefined;
  readonly trampoline: Trampoline;
  /** A JS replacement's callback. */
  readonly callback: NativeCallback | null;
  /** The guard's busy flag (JS replacements): set while the replacement runs. */
  readonly busy: bigint | null;
  /** Where calls that must not enter JS go (see the registry's `Entry.bypass`). */
  readonly bypass: bigint;
  /** The target's `originalSlot`: filled with the original before the entry jump is written. */
  readonly originalSlot: bigint | null;
  /** Canned code's native call counter. */
  readonly counter?: bigint | undefined;
  /** How many adjacent u64 counters from `counter` the count sums (a native probe's two); 1 when absent. */
  readonly counters?: number | undefined;
}

/**
 * A live redefinition. `restore()` (or leaving a `using` scope) puts the original bytes and page
 * protections back exactly; `original(...)` calls the function as it was.
 *
 * @example
 * ```ts
 * import { redefine } from "@redefine/redefine";
 * const patch = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => -x);
 * patch.active; // true
 * patch.original(-5n); // 5n: the real labs, through the trampoline
 * patch.restore();
 * patch.active; // false
 * ```
 */
export class Patch<P extends readonly NativeType[], R extends NativeType> {
  /** The function's entry (the symbol's address, even when the jump is written after `endbr64`). */
  readonly address: bigint;
  /** The signature the patch was made with. */
  readonly signature: { readonly parameters: P; readonly result: R };
  #applied: Applied | null;
  /** One registry entry per write; the first is the one messages and `depth` speak of. */
  readonly #entries: readonly Entry[];
  #original: OriginalStub | undefined;
  /** What the `originalSlot` held before the patch filled it, put back if the patch never goes live. */
  #slotBefore = 0n;
  /** The counter's last reading, once restored (its memory goes back to the pool). */
  #calls: number | undefined;

  /**
   * @internal Made by `redefine()`, which then does the writes: the patch is registered (each
   * write layered on the newest patch of its place) from here on; `abandon()` if a write fails.
   */
  constructor(address: bigint, signature: { parameters: P; result: R }, applied: Applied) {
    this.address = address;
    this.signature = signature;
    this.#applied = applied;
    const { destination, bypass, writes } = applied;
    // Made at its length: a list grown from empty reserves room for 16.
    const entries = new Array<Entry>(writes.length);
    for (let i = 0; i < writes.length; i++) {
      const { key, at, written, original } = writes[i]!;
      const entry = {
        address: key, at, written, original, destination, bypass, restoring: false, handle: this, slot: -1, owner: 0n, retired: false,
        layers: null,
      };
      entries[i] = entry;
      register(entry);
    }
    this.#entries = entries;
    if (applied.originalSlot !== null) {
      this.#slotBefore = storeSlot(applied.originalSlot, applied.trampoline.address);
    }
  }

  /** True until the patch is restored. */
  get active(): boolean {
    return this.#applied !== null;
  }

  /**
   * The module the redefined function lives in, as `modules()` names it: `"libc.so.6"`, the vDSO
   * (`"linux-vdso.so.1"`) for glibc's `time`, or the runtime's own executable — Bun's exports a
   * `memcmp` of its own, which a target without `library` finds first. "" when no module holds it.
   */
  get library(): string {
    return moduleAt(this.address)?.name ?? "";
  }

  /** Where the entry jump is written: `address`, or just after a landing pad such as `endbr64`. */
  get patchedAddress(): bigint {
    return this.#applied?.writes[0]?.at ?? this.address;
  }

  /** @internal Where the native counters are while the patch is live (a native probe's record). */
  get counterAddress(): bigint | undefined {
    return this.#applied?.counter;
  }

  /**
   * The original function as a native address, for a native replacement to call: the trampoline
   * (the relocated first instructions and a jump back into the function) while the patch is live
   * — or, for a patch layered on another, the replacement below it — and the function itself once
   * restored. Throws `UNRELOCATABLE` when the first instructions could not be moved.
   */
  get originalAddress(): bigint {
    return this.#applied ? this.#applied.trampoline.address : this.address;
  }

  /**
   * Calls the original function, with the signature's JS types, at the runtime's full FFI speed.
   * Works while the patch is live (through the trampoline) and after it is restored (the function
   * itself). Throws `UNRELOCATABLE` when the first instructions could not be moved.
   */
  get original(): (...args: JsArguments<P>) => JsValue<R> {
    const address = this.originalAddress;
    const signature = nativeSignature(this.signature);
    const key = `${this.#entries[0]!.address}:${this.depth}:${signature.parameters.join()}:${signature.result}`;
    this.#original = machine().originals.acquire(key, signature, address);
    const call = this.#original.call;
    // The stub stays this patch's for good (restore re-points it at the function itself), so from
    // now on the property is the stub's function: `patch.original(x)` costs a direct FFI call, with
    // no getter run per call.
    Object.defineProperty(this, "original", { value: call, enumerable: false });
    return call;
  }

  /**
   * How many calls reached a canned replacement (`returns()`, `sequence()`, a fake clock's) or a
   * native probe (the trace command's), counted natively and atomically on every thread; after
   * restore, the count it stopped at. Undefined for other replacements.
   */
  get calls(): number | undefined {
    const counter = this.#applied?.counter;
    if (counter === undefined) return this.#calls;
    const n = this.#applied!.counters ?? 1;
    const view = machine().platform.runtime.view(counter, 8 * n);
    const words = new BigUint64Array(view.buffer, view.byteOffset, n);
    let sum = 0n;
    for (let i = 0; i < n; i++) sum += Atomics.load(words, i);
    return Number(sum);
  }

  /** How many live patches this one is layered on. */
  get depth(): number {
    return this.#applied ? layers(this.#entries[0]!.address).indexOf(this.#entries[0]!) : 0;
  }

  /**
   * Puts the original bytes and page protections back (for a layered patch: the patch below it).
   * Refuses with PATCH_MODIFIED when the bytes at the entry are no longer the ones this patch
   * wrote, and with OUT_OF_ORDER while a newer patch is layered on this one. Throws UNLOADED when
   * the function's library was unloaded since: the patch is dropped, as nothing is left to put
   * back. A second call does nothing. Inside `transaction()`, takes effect when the transaction
   * commits.
   */
  restore(): void {
    if (!joinSection()) return exclusive(() => this.#restore());
    this.#restore();
  }

  #restore(): void {
    const applied = this.#applied;
    const entries = this.#entries;
    if (!applied || entries[0]!.restoring) return;
    // The patch layered right on each write, if any (a list only when there is one).
    let overs: (Entry | undefined)[] | null = null;
    let blocked = -1;
    for (let i = 0; i < entries.length; i++) {
      const stack = layersOf(entries[i]!);
      const over = stack[stack.indexOf(entries[i]!) + 1];
      if (over === undefined) continue;
      (overs ??= [])[i] = over;
      if (blocked < 0 && !over.restoring) blocked = i;
    }
    if (blocked >= 0) {
      // Another isolate's patch leads through this one: a guarded one can step aside in place.
      const stack = layersOf(entries[blocked]!);
      const above = stack.slice(stack.indexOf(entries[blocked]!) + 1);
      if (entries.length === 1 && applied.busy !== null && above.every(isForeign)) return this.#retire(applied);
      throw new RedefineError(
        "OUT_OF_ORDER",
        `the function at ${hex(this.address)} was redefined again on top of this patch${isForeign(overs![blocked]!) ? " by another isolate (a Worker)" : ""}: restore the ` +
          `newer patch first (restoreAll() goes newest first).`,
      );
    }
    const { arch } = machine();
    // Where each place is now (the mapping found at patch time is stale once its library is
    // unloaded): gone places have nothing to put back and are not read.
    // Made at its length: a list grown from empty reserves room for 16.
    const places = new Array<Mapping | null>(entries.length);
    let any = false;
    for (let i = 0; i < entries.length; i++) {
      const entry = entries[i]!;
      const place = mappedNow(mappingAt, entry.at, Math.max(entry.written.length, entry.original.length));
      places[i] = place;
      if (!place) continue;
      // Under a patch whose restore is pending in this transaction, the place will hold our bytes
      // again once that write lands; that patch has checked them. Made in the open transaction, it
      // holds our bytes once that transaction's writes land.
      const length = entry.written.length;
      const pending = overs?.[i] ? entry.written : pendingAt(entry.at, length);
      if (pending ? !holdsAt(pending, 0, entry.written) : !liveHolds(entry.at, entry.written)) {
        const now = pending ?? liveBytes(entry.at, length);
        const isEntry = entry.address === this.address;
        if (replaced(isEntry, entry.at, applied.writes[i]!.mapping, place)) {
          places[i] = null;
          continue;
        }
        const where = isEntry ? "the entry of the function" : "the import slot";
        throw new RedefineError(
          "PATCH_MODIFIED",
          `${where} at ${hex(entry.at)} changed after the function at ${hex(this.address)} was redefined ` +
            `(expected ${hexBytes(entry.written)}, found ${hexBytes(now.slice())}), so something else patched it: ` +
            `restore that patch first (redefine leaves these bytes alone rather than clobber them).`,
        );
      }
      any = true;
    }
    if (!any) return this.#drop(applied);
    setRestoring(entries, true);
    const restored = () => {
      setRestoring(entries, false);
      this.#original?.point(this.address);
      if (applied.originalSlot !== null) storeSlotIfMapped(applied.originalSlot, this.address);
      this.#forget(applied, applied.busy, true);
      closeWhenIdle(applied);
    };
    const kept = () => {
      setRestoring(entries, false);
    };
    // One write goes alone, or with the enclosing transaction, as `schedule` sends it; several
    // (import slots, those of unloaded libraries left out) go together.
    if (entries.length === 1) return schedule(restoreWrite(entries[0]!, places[0]!, arch.selfLoop), restored, kept);
    const last = places.findLastIndex((place) => place);
    transaction(() =>
      entries.forEach((entry, i) => {
        if (places[i]) schedule(restoreWrite(entry, places[i]!, arch.selfLoop), i === last ? restored : () => {}, kept);
      })
    );
  }

  /**
   * Forgets a patch whose every place is gone with its library (unmapped, or other memory now):
   * nothing is left to put back, and a patch kept would fail every later restore and `restoreAll()`.
   */
  #drop(applied: Applied): never {
    this.#original?.point(this.address);
    if (applied.originalSlot !== null) storeSlotIfMapped(applied.originalSlot, this.address);
    this.#forget(applied, applied.busy, true);
    closeWhenIdle(applied);
    const where = this.#entries.length > 1 ? "the import slots it rewrote are" : "its code is";
    throw new RedefineError(
      "UNLOADED",
      `the function at ${hex(this.address)} cannot be restored: ${where} gone (unmapped, or other memory ` +
        `in its place), so its library was unloaded after it was redefined. The patch is dropped; restore ` +
        `patches before unloading their library (dlclose, FreeLibrary).`,
    );
  }

  /**
   * Makes a guarded patch inert where it is (its guard's busy flag gets the retired bit: every call
   * goes to the original), for another isolate's patch layered on it; its code stays, as that
   * patch's original leads through it, and goes when that patch is restored.
   */
  #retire(applied: Applied): void {
    const entry = this.#entries[0]!;
    const done = () => {
      entry.restoring = false;
      retire(entry);
      this.#original?.point(this.address);
      this.#calls = this.calls;
      this.#applied = null;
      closeWhenIdle(applied);
      const busy = machine().platform.runtime.view(applied.busy!, 1);
      busy[0] = busy[0]! | 2;
    };
    const batch = machine().batch;
    if (!batch) return done();
    entry.restoring = true;
    batch.commits.push(done);
    batch.rollbacks.push(() => (entry.restoring = false));
  }

  /** @internal Undoes the constructor for a patch whose entry jump was never written. */
  abandon(): void {
    const applied = this.#applied;
    if (!applied) return;
    if (applied.originalSlot !== null) storeSlotIfMapped(applied.originalSlot, this.#slotBefore);
    this.#forget(applied, null);
    applied.callback?.close();
  }

  /** Restores at the end of a `using` scope. */
  [Symbol.dispose](): void {
    this.restore();
  }

  /**
   * Unregisters the patch (`restored`: its restore wrote the bytes) and gives its code back (the
   * stub after its guard's `busy` flag clears).
   */
  #forget(applied: Applied, busy: bigint | null, restored = false): void {
    this.#calls = this.calls;
    for (let i = 0; i < this.#entries.length; i++) unregister(this.#entries[i]!, restored);
    this.#applied = null;
    if (applied.stub) releaseSlot(applied.stub, busy, applied.reuse ?? null);
    applied.trampoline.release();
  }
}

/** The write that puts `entry`'s place (found in `mapping` now) back. */
function restoreWrite(entry: Entry, mapping: Mapping, spin: Uint8Array): CodeWrite {
  return { address: entry.at, bytes: restoredBytes(entry), spin, mapping, expected: entry.written };
}

/** Marks every entry's restore pending (or no longer). */
function setRestoring(entries: readonly Entry[], restoring: boolean): void {
  for (let i = 0; i < entries.length; i++) entries[i]!.restoring = restoring;
}

/**
 * Whether a place holding other bytes than its patch wrote is other memory now, its library
 * unloaded and something else mapped there: a function's entry in a mapping of another file (or
 * of none) where the patch found a file's, an import slot in no loaded library.
 */
function replaced(isEntry: boolean, at: bigint, then: Mapping | undefined, now: Mapping): boolean {
  if (!isEntry) return moduleAt(at) === null;
  return then?.file !== undefined && !sameFile(then.file, now.file);
}

/**
 * Stores `value` in a patch's `originalSlot` once it has ended (restored, dropped or abandoned)
 * when the slot is still writable memory: a transaction's body, user code, may have unmapped it
 * since it was checked (the slot goes with it, and nothing is left to put back).
 */
function storeSlotIfMapped(slot: bigint, value: bigint): void {
  const mapping = mappingAt(slot);
  if (mapping !== null && (mapping.protection & (PROT_READ | PROT_WRITE)) === (PROT_READ | PROT_WRITE)) storeSlot(slot, value);
}

/** Stores `value` in the 8-byte aligned slot at `slot` in one store; returns what was there. */
function storeSlot(slot: bigint, value: bigint): bigint {
  const view = machine().platform.runtime.view(slot, 8);
  const word = new BigInt64Array(view.buffer, view.byteOffset, 1);
  return BigInt.asUintN(64, Atomics.exchange(word, 0, BigInt.asIntN(64, value)));
}

/**
 * Closes a restored patch's callback. Restored from inside the replacement, the callback is still
 * running: it closes once the replacement has returned (the guard's busy flag says when).
 */
function closeWhenIdle(applied: Applied): void {
  const callback = applied.callback;
  if (!callback) return;
  if (applied.busy !== null && liveBytes(applied.busy, 1)[0] !== 0) {
    setTimeout(() => callback.close(), 0);
  } else {
    callback.close();
  }
}
