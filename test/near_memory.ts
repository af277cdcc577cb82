/**
 * A pool that refuses what lies near an entry, the way a full address space does: tests of what a
 * patch does when the memory within some jump's reach is taken (qemu-user's own mappings, which
 * the guest's maps do not show, can fill the ±128 MiB around arm64's libc); and a native
 * replacement placed wherever the pool has memory, out of the near jumps' reach meanwhile.
 */
import { machine } from "../src/registry.ts";
import { ANYWHERE } from "../src/arch/types.ts";
import { isArm64, words } from "./native.ts";

/** A native function returning 4242, for native redirects. */
export const FORTY_TWO: readonly number[] = isArm64
  ? words(
    0xd2821240, // mov x0, #4242
    0xd65f03c0, // ret
  )
  : [0xb8, 0x92, 0x10, 0x00, 0x00, 0xc3]; // mov eax, 4242; ret

/**
 * Runs `body` with `FORTY_TWO` in a pool slot wherever the pool puts code for `entry` that may
 * lie anywhere (beyond the near jumps' reach inside `withNearMemoryTaken`); the slot is given back
 * after.
 */
export function withFortyTwoAnywhere<T>(entry: bigint, body: (replacement: bigint) => T): T {
  const { pool } = machine();
  const slot = pool.allocate(entry, ANYWHERE, FORTY_TWO.length)!;
  try {
    pool.write(slot, Uint8Array.from(FORTY_TWO));
    return body(slot.address);
  } finally {
    pool.release(slot, null);
  }
}

/**
 * Runs `body` while the pool has no memory within `reach` of `entry` (and a megabyte more, so that
 * no slot lands at the edge of that reach): each request gets memory in the part of its window
 * outside that range, nearest part first, or none.
 */
export function withNearMemoryTaken(entry: bigint, reach: bigint, body: () => void): void {
  const { pool } = machine();
  const allocate = pool.allocate;
  const taken = reach + 2n ** 20n;
  pool.allocate = (near, reach, size, dataSize) => {
    const low = near > reach ? near - reach : 0n, high = near + reach;
    const parts: [bigint, bigint][] = [];
    if (low < entry - taken) parts.push([low, high < entry - taken ? high : entry - taken]);
    if (high > entry + taken) parts.push([low > entry + taken ? low : entry + taken, high]);
    const distance = ([from, to]: [bigint, bigint]) => (near < from ? from - near : near > to ? near - to : 0n);
    parts.sort((a, b) => (distance(a) < distance(b) ? -1 : 1));
    for (const [from, to] of parts) {
      const slot = allocate.call(pool, (from + to) / 2n, (to - from) / 2n, size, dataSize);
      if (slot) return slot;
    }
    return null;
  };
  try {
    body();
  } finally {
    pool.allocate = allocate;
  }
}
