/**
 * Transactions: the entry writes of many patches and restores collected and applied as one
 * all-or-nothing `writeCode`, with each change's bookkeeping committed after it lands or rolled
 * back when anything fails. Outside a transaction every write goes alone, straight away.
 */
import { writeCode } from "./code_memory.ts";
import type { CodeWrite } from "./code_memory.ts";
import { exclusive, machine } from "./registry.ts";
import type { Batch } from "./registry.ts";

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
    return;
  }
  try {
    writeCode(m.platform, [write]);
  } catch (error) {
    rollback();
    throw error;
  }
  commit();
}

/**
 * Applies everything `body` redefines and restores as one transaction: each page is made writable
 * once and gets its protection back once, however many patches it holds, and if anything fails —
 * in `body` or while writing — every page and byte is as it was before and the error is rethrown.
 * Patches made in `body` become active when it returns. Nested transactions join the outer one.
 * Other isolates (Workers) wait to patch until it is over.
 *
 * @example
 * ```ts
 * import { redefine, restoreAll, transaction } from "./mod.ts";
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
  if (m.batch) return body();
  const batch: Batch = { writes: [], commits: [], rollbacks: [] };
  m.batch = batch;
  let result: T;
  try {
    result = body();
    m.batch = null;
    writeCode(m.platform, batch.writes);
  } catch (error) {
    m.batch = null;
    for (const rollback of batch.rollbacks.reverse()) rollback();
    throw error;
  }
  for (const commit of batch.commits) commit();
  return result;
}
