/**
 * `redefine()`, `redefineAll()` and `restoreAll()`: the flow from a target and a replacement to a
 * live patch. Locate and check the site (src/target.ts), make the replacement a destination
 * (src/replacement.ts), lay out the stub and trampoline (src/layout.ts), then register the Patch
 * (src/patch.ts, src/registry.ts) and write its entry jump, now or with the enclosing transaction
 * (src/transaction.ts). A target with `callers` takes the other road, src/import_slots.ts: the
 * import slots of those libraries are rewritten instead of the entry.
 */
import type { NativeType } from "./signature.ts";
import { locate } from "./target.ts";
import type { Site, Target } from "./target.ts";
import { destinationFor, discard, nativeAddress } from "./replacement.ts";
import type { Destination, Replacement } from "./replacement.ts";
import { layOut, release } from "./layout.ts";
import type { Layout } from "./layout.ts";
import { Patch } from "./patch.ts";
import { exclusive, joinSection, keep, layers, machine, newestFirst, ourCalls, refuseOverlap } from "./registry.ts";
import type { Entry } from "./registry.ts";
import { schedule, transaction } from "./transaction.ts";
import { redefineCallers } from "./import_slots.ts";

/**
 * Redefines a native function: every caller of `target`, native code and the runtime included, runs
 * `replacement` instead until the patch is restored.
 *
 * @example
 * ```ts
 * import { redefine } from "@redefine/redefine";
 * const patch = redefine(
 *   { symbol: "getpid", library: "libc.so.6", parameters: [], result: "i32" },
 *   () => 4242,
 * );
 * try {
 *   // every native caller of getpid now gets 4242
 * } finally {
 *   patch.restore();
 * }
 * ```
 */
export function redefine<const P extends readonly NativeType[], const R extends NativeType>(
  target: Target<P, R>,
  replacement: NoInfer<Replacement<P, R>>,
): Patch<P, R> {
  if (!joinSection()) return exclusive(() => redefineLocked(target, replacement));
  return redefineLocked(target, replacement);
}

function redefineLocked<const P extends readonly NativeType[], const R extends NativeType>(
  target: Target<P, R>,
  replacement: Replacement<P, R>,
): Patch<P, R> {
  if ("callers" in target && target.callers !== undefined) {
    return redefineCallers(target, (signature) => destinationFor(signature, replacement));
  }
  const site = locate(target);
  return applyLocked(site, destinationFor(site.signature, replacement));
}

/**
 * Redefines many functions at once, all or nothing: `transaction()` around one `redefine()` each.
 *
 * @example
 * ```ts
 * import { redefineAll, restoreAll } from "@redefine/redefine";
 * const patches = redefineAll([
 *   [{ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" }],
 *   [{ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => x * 2n],
 * ]);
 * patches[1].original(-3n); // 3n: each patch keeps its own target's signature
 * restoreAll();
 * ```
 */
export function redefineAll<const T extends readonly Target<readonly NativeType[], NativeType>[]>(
  // Mapped over the targets, so each entry's replacement and patch get that target's signature.
  entries: { readonly [K in keyof T]: readonly [T[K], T[K] extends Target<infer P, infer R> ? Replacement<P, R> : never] },
): { -readonly [K in keyof T]: T[K] extends Target<infer P, infer R> ? Patch<P, R> : never } {
  const pairs = entries as readonly (readonly [Target<readonly NativeType[], NativeType>, never])[];
  return transaction(() => pairs.map(([target, replacement]) => redefine(target, replacement))) as never;
}

/**
 * Restores every live patch, newest first, as one transaction: all of them or (when one refuses,
 * e.g. PATCH_MODIFIED) none.
 *
 * @example
 * ```ts
 * import { redefine, restoreAll } from "@redefine/redefine";
 * redefine({ symbol: "getpid", parameters: [], result: "i32" }, () => 1);
 * restoreAll();
 * ```
 */
export function restoreAll(): void {
  transaction(() => {
    const entries = newestFirst();
    // Indexed: a `for…of` step allocates until the optimizing compiler has the loop. No user code
    // runs between these restores: the mappings one has found stay true for the next.
    ourCalls(() => {
      for (let i = 0; i < entries.length; i++) entries[i]!.handle.restore();
    });
  });
}

/**
 * Sends the callers of `target` to `to`: locates the function (in the section, as the map has it
 * since user code last ran), lays out the code, registers the patch and writes the entry jump.
 * What fails before the write leaves nothing allocated, and closes `to`'s callback.
 */
export function apply<P extends readonly NativeType[], R extends NativeType>(
  target: Target<P, R>,
  to: Destination,
): Patch<P, R> {
  if (!joinSection()) return exclusive(() => applyLocked(locate(target), to));
  return applyLocked(locate(target), to);
}

function applyLocked<P extends readonly NativeType[], R extends NativeType>(site: Site<P, R>, to: Destination): Patch<P, R> {
  // Layered on the function's newest patch, unless that one's restore is pending in this
  // transaction: then on the newest that stays, or on the function itself.
  const stack = layers(site.address);
  let under: Entry | null = null;
  for (let i = stack.length - 1; i >= 0 && under === null; i--) if (!stack[i]!.restoring) under = stack[i]!;
  let layout: Layout | undefined;
  try {
    layout = layOut(site, to, under);
    // `locate` refused overlaps of the shortest entry jump's bytes (`entryJumps[0]`): only a wider reach is asked again.
    if (layout.covers > machine().arch.entryJumps[0].size) refuseOverlap(site.at, layout.covers);
  } catch (error) {
    if (layout) release(layout);
    discard(to);
    throw error;
  }
  // What the entry holds once every earlier write has landed: the function's bytes, under the
  // jump of the patch below if there is one.
  const original = keep(site.code, layout.entry.length);
  if (under) original.set(under.written.subarray(0, original.length));
  const patch = new Patch(site.address, site.signature, {
    writes: [{ key: site.address, at: site.at, original, written: layout.entry, mapping: site.mapping }],
    destination: layout.destination,
    stub: layout.stub,
    reuse: layout.reuse,
    trampoline: layout.trampoline,
    callback: to.kind === "callback" ? to.callback : null,
    busy: layout.busy,
    bypass: layout.bypass,
    originalSlot: site.originalSlot,
    counter: layout.counter,
    counters: layout.counters,
  });
  schedule(
    {
      address: site.at,
      bytes: layout.entry,
      spin: machine().arch.selfLoop,
      mapping: site.mapping,
      expected: original,
      unread: site.unread && unreadTaken(site, layout),
      leadsTo: nativeAddress(to),
    },
    nothing,
    () => patch.abandon(),
  );
  return patch;
}

/**
 * What of a remembered site's bytes (`Site.unread`) its layout took, for the commit to compare
 * with the code: the landing pad, the bytes the entry jump covers and those its trampoline moved.
 * Past them the code is not the layout's (another function's patched entry may lie there, which
 * `refuseOverlap` kept out of these), as a fresh read reuses a plan on these bytes alone.
 */
function unreadTaken(site: Site<readonly NativeType[], NativeType>, layout: Layout): { at: bigint; bytes: Uint8Array } {
  const pad = Number(site.at - site.address);
  const taken = Math.max(layout.covers, site.place.plan?.moved.length ?? 0);
  return { at: site.address, bytes: site.unread!.subarray(0, pad + taken) };
}

/** A new patch's entry write needs no bookkeeping once it lands: the patch is live from the start. */
function nothing(): void {}
