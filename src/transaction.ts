/**
 * Transactions: the entry writes of many patches and restores collected and applied as one
 * all-or-nothing `writeCode`, with each change's bookkeeping committed after it lands or rolled
 * back when anything fails. Outside a transaction every write goes alone, straight away. Writes
 * that cancel out (a patch made and restored in the same transaction) are not made at all; a
 * nested transaction that throws rolls back its own part only.
 */
import { mappedNow, writeCode } from "./code_memory.ts";
import type { CodeWrite, WriteOptions } from "./code_memory.ts";
import { exclusive, forgetSeen, holdsAt, lent, liveBytes, liveHolds, machine, mappingAt, recheckHints, userCodeRan } from "./registry.ts";
import { hex, hexBytes, RedefineError } from "./errors.ts";
import type { Batch } from "./registry.ts";

/** How the registry's writes go: with what it lends them (one object for all). */
const LENT: WriteOptions = { lent };

/**
 * Writes `write` now, or with the enclosing transaction. `commit` runs once the bytes are in place;
 * `rollback` when they never will be.
 */
export function schedule(write: CodeWrite, commit: () => void, rollback: () => void): void {
  const m = machine();
  if (m.batch) {
    m.batch.writes.push(write);
    m.batch.commits.push(commit);
    m.batch.rollbacks.push(rollback);
    const index = m.batch.byAddress;
    const same = index?.get(write.address);
    if (same === undefined) index?.set(write.address, write);
    else if (Array.isArray(same)) same.push(write);
    else index!.set(write.address, [same, write]);
    return;
  }
  try {
    writeCode(m.platform, [write], LENT);
  } catch (error) {
    rollback();
    throw error;
  }
  commit();
}

/**
 * What the `length` bytes at `address` will be once the open transaction's writes have landed, or
 * null when it writes nothing there (or there is no open transaction).
 */
export function pendingAt(address: bigint, length: number): Uint8Array | null {
  const batch = machine().batch;
  if (!batch) return null;
  // Indexed on first use: restoreAll() asks once per patch, and a scan each time would make it
  // quadratic in the number of patches.
  batch.byAddress ??= Map.groupBy(batch.writes, (w) => w.address);
  const writes = batch.byAddress.get(address);
  return writes ? outcome(Array.isArray(writes) ? writes : [writes], length) : null;
}

/** The bytes at the writes' common address once they have all landed, in order. */
function outcome(writes: readonly CodeWrite[], length = 0): Uint8Array {
  const size = Math.max(length, ...writes.map((w) => w.bytes.length));
  const bytes = machine().platform.runtime.view(writes[0]!.address, size).slice();
  for (const write of writes) bytes.set(write.bytes);
  return bytes.subarray(0, length || size);
}

/**
 * The writes minus those of each address whose writes, together, leave its bytes as they are;
 * `byAddress` is the batch's index of them when it has one.
 */
function net(writes: readonly CodeWrite[], byAddress?: Map<bigint, CodeWrite | CodeWrite[]>): readonly CodeWrite[] {
  if (writes.length < 2) return writes;
  if (!byAddress) {
    // Most batches write each place once: a set tells, without a list per place.
    const places = new Set<bigint>();
    for (let i = 0; i < writes.length; i++) places.add(writes[i]!.address);
    if (places.size === writes.length) return writes;
    byAddress = Map.groupBy(writes, (w) => w.address);
  }
  if (byAddress.size === writes.length) return writes;
  const idle = new Set<bigint>();
  for (const [address, group] of byAddress) {
    if (!Array.isArray(group) || group.length < 2) continue;
    const after = outcome(group);
    // Not read where it is gone: the write, made then, refuses the place (INVALID_ADDRESS).
    if (!mappedNow(mappingAt, address, after.length)) continue;
    const now = machine().platform.runtime.view(address, after.length);
    if (after.every((b, i) => b === now[i])) idle.add(address);
  }
  return writes.filter((w) => !idle.has(w.address));
}

/**
 * Refuses a commit, before anything is written, where a place holds other bytes than its first
 * write in the batch expects (`CodeWrite.expected`; a later write there expects what the earlier
 * wrote; a patch laid out from remembered bytes, all of `CodeWrite.unread`). The body was user
 * code: it may have written the entry itself, or unmapped its code and
 * had other code mapped at the same address with the same protection (Node maps a binding's call
 * code on its first call, into a hole just left as readily as anywhere), which the hints' check
 * cannot tell from the old code. `netted` is the batch's writes less those that cancel out (whole
 * places: a place's writes go or stay together), `rechecked` the same after that check, index for
 * index: where a write's mapping still holds, its bytes are read through the kept page views;
 * where it was dropped, only once found mapped (an unmapped place is the write's to refuse).
 */
function refuseChanged(batch: Batch, netted: readonly CodeWrite[], rechecked: readonly CodeWrite[]): void {
  const m = machine();
  const size = m.platform.os.pageSize;
  // The page read last, and its kept view: most writes share a page with the one before.
  let page = -1n;
  let view: Uint8Array | null = null;
  for (let i = 0; i < rechecked.length; i++) {
    const w = rechecked[i]!;
    // A patch laid out from remembered bytes is checked against all of them, from the entry.
    const unread = w.unread;
    const expected = unread ? unread.bytes : w.expected;
    if (!expected) continue;
    const from = unread ? unread.at : w.address;
    const within = from % m.pageBytes;
    const offset = Number(within);
    let holds: boolean;
    if (w.mapping !== undefined && offset + expected.length <= size) {
      // In one page of a mapping that still holds: read through the page's kept view.
      const start = from - within;
      if (start !== page) {
        page = start;
        view = liveBytes(start, size);
      }
      holds = holdsAt(view!, offset, expected);
    } else {
      if (!mappedNow(mappingAt, from, expected.length)) continue;
      holds = liveHolds(from, expected);
    }
    if (holds) continue;
    // Not the first write there (a patch layered on one made in this body, a restore of one):
    // it finds what the earlier one writes. Indexed as `pendingAt` indexes it.
    batch.byAddress ??= Map.groupBy(batch.writes, (x) => x.address);
    const group = batch.byAddress.get(w.address)!;
    if ((Array.isArray(group) ? group[0] : group) !== netted[i]) continue;
    const found = m.platform.runtime.view(from, expected.length).slice();
    // Code that changed while its memory stayed mapped: no remembered bytes are trusted now, and
    // the next patch reads them afresh.
    if (unread) forgetSeen(m);
    throw new RedefineError(
      "PATCH_MODIFIED",
      `the code at ${hex(from)} changed while the transaction's body ran${unread ? ", or since redefine last read it" : ""} ` +
        `(expected ${hexBytes(expected)}, ` +
        `found ${hexBytes(found)}): the body wrote it, or unmapped it and other code was mapped there. ` +
        `Nothing was written and the transaction rolled back: redefine or restore it again outside such a body.`,
    );
  }
}

/**
 * Applies everything `body` redefines and restores as one transaction: a run of pages taking 4
 * stores or more is made writable once and gets its protection back once, however many patches it
 * holds (fewer stores go through the kernel's forced write where the system has one and asks for
 * it, `Os.protectFrom`: Linux takes the protection way for every store), and if
 * anything fails — in `body` or while writing — every page and byte is as it was before and the
 * error is rethrown.
 * Patches made in `body` become active when it returns. A nested transaction joins the outer one:
 * written with it, or, when its body throws, rolled back on its own before the error goes on.
 * Other isolates (Workers) wait to patch until it is over.
 *
 * @example
 * ```ts
 * import { redefine, restoreAll, transaction } from "@redefine/redefine";
 * const [a, b] = transaction(() => [
 *   redefine({ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" }),
 *   redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => x),
 * ]);
 * transaction(() => restoreAll());
 * ```
 */
export function transaction<T>(body: () => T): T {
  return exclusive(() => transactionLocked(body));
}

function transactionLocked<T>(body: () => T): T {
  const m = machine();
  if (m.batch) return nested(m.batch, body);
  const batch: Batch = { writes: [], commits: [], rollbacks: [] };
  m.batch = batch;
  let result: T;
  try {
    result = body();
    m.batch = null;
    // The body was user code: what the section had seen of the map (the hints the writes carry,
    // the native code they lead to) may be stale by now, unmapped even. A lone write outside a
    // transaction keeps its hint unchecked: no user code runs between its query and the write.
    userCodeRan();
    // Writes that cancel out are dropped first: a patch made and restored in the body writes
    // nothing, so what its replacement has become since is no reason to refuse the rest.
    const netted = net(batch.writes, batch.byAddress);
    const writes = recheckHints(netted);
    refuseChanged(batch, netted, writes);
    writeCode(m.platform, writes, LENT);
  } catch (error) {
    m.batch = null;
    // The body, user code, may have unmapped what the rollbacks write (a patch's originalSlot).
    userCodeRan();
    for (const rollback of batch.rollbacks.reverse()) rollback();
    throw error;
  }
  // The slots the commits release (restored patches' stubs) are unreachable since the writes
  // above: their quarantine runs from now, one clock read for all. Indexed: a `for…of` step
  // allocates until the optimizing compiler has the loop.
  m.pool.releasedSince(performance.now(), () => {
    for (let i = 0; i < batch.commits.length; i++) batch.commits[i]!();
  });
  return result;
}

/**
 * Runs a nested transaction's body in `batch`; when it throws, undoes what it added there. Each list
 * has its own mark: bookkeeping is queued without a write too (a fake clock's state, a guarded
 * patch stepping aside), so the lists need not be as long as each other.
 */
function nested<T>(batch: Batch, body: () => T): T {
  const writes = batch.writes.length, commits = batch.commits.length, rollbacks = batch.rollbacks.length;
  try {
    return body();
  } catch (error) {
    // As the outer commit's rollback: the body may have unmapped what the rollbacks write.
    userCodeRan();
    batch.writes.splice(writes);
    batch.byAddress = undefined;
    batch.commits.splice(commits);
    for (const rollback of batch.rollbacks.splice(rollbacks).reverse()) rollback();
    throw error;
  }
}
