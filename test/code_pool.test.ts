// The code pool asks the platform for few blocks: a block's data is sized for the slots that made
// it (a JS replacement's guard record outweighs its code), and where near space is too scarce for
// a whole block (arm64 under qemu) the pool falls back to the exact sizes of the one slot; what
// the platform just refused, it does not ask again within a quarantine.
import { assert, test } from "./harness.ts";
import { platform } from "../platform/mod.ts";
import type { CodeBlock, Platform } from "../platform/mod.ts";
import { CodePool, QUARANTINE_MS } from "../src/code_memory.ts";
import type { CodeSlot } from "../src/code_memory.ts";

/** A platform whose `allocateCode` hands out fake blocks (never written) and records each request. */
function fakeBlocks(refuse: (size: number) => boolean = () => false) {
  const real = platform();
  const asked: { size: number; dataSize: number | undefined }[] = [];
  let next = 0x7000_0000_0000n;
  const allocateCode = (_near: bigint, _reach: bigint, size: number, dataSize?: number): CodeBlock | null => {
    asked.push({ size, dataSize });
    if (refuse(size)) return null;
    const data = dataSize ?? real.os.pageSize;
    const block = { address: next, writable: next + 2n ** 32n, size, data: next + BigInt(size), dataSize: data };
    next += BigInt(size + data) + 2n ** 20n;
    return block;
  };
  const fake: Platform = { ...real, os: { ...real.os, allocateCode } };
  return { pool: new CodePool(fake), asked, pageSize: real.os.pageSize };
}

test("code pool: 1000 slots of a JS replacement's sizes (48 code, 64 data bytes) come from one block", () => {
  const { pool, asked } = fakeBlocks();
  const slots = Array.from({ length: 1000 }, () => pool.allocate(0x7000_0000_0000n, 2n ** 31n, 48, 64)!);
  assert.equal(asked.length, 1, "one block");
  assert.ok(asked[0]!.dataSize! >= (asked[0]!.size / 48) * 64, "data for as many slots as the code holds");
  const data = new Set(slots.map((s) => s.data));
  assert.equal(data.size, 1000, "each slot its own data");
  for (const s of slots) {
    assert.ok(s.data >= s.block.data && s.data + 64n <= s.block.data + BigInt(s.block.dataSize), "data inside its block");
  }
});

test("code pool: a block made for slots without data has one page of it", () => {
  const { pool, asked, pageSize } = fakeBlocks();
  pool.allocate(0x7000_0000_0000n, 2n ** 31n, 40);
  assert.deepEqual(asked, [{ size: 64 * 1024, dataSize: pageSize }]);
});

test("code pool: a block's data is at most 4 bytes per code byte, and always holds the slot that made it", () => {
  const { pool, asked } = fakeBlocks();
  pool.allocate(0x7000_0000_0000n, 2n ** 31n, 16, 4096);
  pool.allocate(0x7000_0000_0000n, 2n ** 31n, 100_000, 600_000);
  assert.deepEqual(asked, [{ size: 64 * 1024, dataSize: 4 * 64 * 1024 }, { size: 102_400, dataSize: 602_112 }]);
});

test("code pool: where a whole block cannot be had in reach, the slot's exact code and data sizes are asked", () => {
  const { pool, asked, pageSize } = fakeBlocks((size) => size > 4096);
  const slot = pool.allocate(0x7000_0000_0000n, 2n ** 27n, 48, 64);
  assert.ok(slot, "a slot from the small block");
  assert.deepEqual(asked.map((a) => a.size), [64 * 1024, pageSize]);
  assert.equal(asked[1]!.dataSize, pageSize);
  assert.ok(asked[0]!.dataSize! > pageSize, "the whole block was asked with its data first");
});

/** Waits until a slot released now is out of its quarantine, with a margin for the timer. */
function pastQuarantine(): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, QUARANTINE_MS + 50));
}

/** A real pool with two slots of a JS replacement's sizes taken; `busy` is where a slot's guard flag would be. */
function twoSlots() {
  const { os, runtime } = platform();
  const pool = new CodePool(platform());
  const near = os.symbolAddress("labs");
  const take = () => pool.allocate(near, 2n ** 31n, 48, 64)!;
  const busy = (slot: CodeSlot) => slot.data + 24n;
  return { runtime, pool, take, busy, a: take(), b: take() };
}

test("code pool: a released slot is reused at its size only after the quarantine, and never while its busy flag is set", async () => {
  const { runtime, pool, take, busy, a, b } = twoSlots();
  runtime.view(busy(b), 1)[0] = 1; // b's replacement is running on some thread
  pool.release(a, busy(a));
  pool.release(b, busy(b));
  const early = take();
  assert.ok(early.address !== a.address && early.address !== b.address, "nothing reused inside the quarantine");
  await pastQuarantine();
  const again = take();
  assert.deepEqual([again.address, again.data], [a.address, a.data], "the idle slot comes back, code and data");
  const meanwhile = take();
  assert.ok(meanwhile.address !== b.address, "not the slot whose flag is set");
  runtime.view(busy(b), 1)[0] = 0;
  const last = take();
  assert.deepEqual([last.address, last.data], [b.address, b.data], "the slot comes back once its flag clears");
});

test("code pool: a released slot can be reclaimed, untouched, until it is reused, and never while its busy flag is set", async () => {
  const { runtime, pool, take, busy, a, b } = twoSlots();
  const code = Uint8Array.of(0xc3, 0xcc, 0x90, 0x90);
  pool.write(a, code);
  const ra = pool.release(a, busy(a));
  assert.ok(pool.reclaim(ra), "reclaimed inside the quarantine");
  assert.deepEqual(Array.from(runtime.view(a.address, code.length)), Array.from(code), "its code untouched");
  assert.ok(!pool.reclaim(ra), "only once");
  runtime.view(busy(b), 1)[0] = 1;
  const rb = pool.release(b, busy(b));
  const inUse = pool.codeBytesInUse;
  assert.ok(!pool.reclaim(rb), "not while its replacement runs");
  runtime.view(busy(b), 1)[0] = 0;
  assert.ok(pool.reclaim(rb), "once its flag clears");
  assert.equal(pool.codeBytesInUse, inUse + b.size, "a reclaimed slot is in use again");
  // Released and left: once the quarantine is over it is reused, and its record says so.
  const ra2 = pool.release(a, null);
  await pastQuarantine();
  const again = take();
  assert.equal(again.address, a.address, "the slot goes back to the free lists as before");
  assert.ok(!pool.reclaim(ra2), "no longer reclaimable once reused");
});

test("code pool: slots released inside releasedSince(t) wait out their quarantine from t, not from their release", () => {
  const { pool, take, a, b } = twoSlots();
  const long = performance.now() - 2000; // the writes that made the code unreachable, 2 s ago
  const early = pool.releasedSince(long, () => pool.release(a, null));
  assert.equal(early.since, long);
  const now = pool.release(b, null);
  assert.ok(now.since >= long + 2000, "outside it, from the clock");
  const again = take();
  assert.equal(again.address, a.address, "a's quarantine is over: it is reused");
  assert.notEqual(take().address, b.address, "b's is not");
});

/**
 * A platform with no memory within 2^27 bytes of `NEAR`, the way the ±128 MiB around an arm64
 * library can be full: `allocateCode` counts its calls, refuses what must lie there, and maps
 * other requests at `place(near)` (far away, unless a test says otherwise).
 */
const NEAR = 0x7000_0000_0000n;
const FULL = 2n ** 27n;
function nearMemoryFull(place: (near: bigint) => bigint = () => 0x1000_0000_0000n) {
  const real = platform();
  const calls = { count: 0 };
  const allocateCode = (near: bigint, reach: bigint, size: number, dataSize?: number): CodeBlock | null => {
    calls.count++;
    if (near - reach >= NEAR - FULL && near + reach <= NEAR + FULL) return null;
    const address = place(near);
    return { address, writable: address + 2n ** 32n, size, data: address + BigInt(size), dataSize: dataSize ?? real.os.pageSize };
  };
  return { pool: new CodePool({ ...real, os: { ...real.os, allocateCode } }), calls };
}

test("code pool: a near request that failed is not searched again within the quarantine, and is after it", async () => {
  const { pool, calls } = nearMemoryFull();
  const reach = 2n ** 26n;
  assert.equal(pool.allocate(NEAR, reach, 48, 64), null);
  assert.equal(calls.count, 2, "the whole block, then the exact sizes");
  assert.equal(pool.allocate(NEAR, reach, 48, 64), null, "the same request again");
  assert.equal(pool.allocate(NEAR + 4096n, reach - 8192n, 200, 64), null, "a narrower window, more bytes");
  assert.equal(calls.count, 2, "no search made");
  await pastQuarantine();
  assert.equal(pool.allocate(NEAR, reach, 48, 64), null);
  assert.equal(calls.count, 4, "searched again once the quarantine is over");
});

test("code pool: a failed near request leaves a wider reach, and fewer bytes, to be asked", () => {
  const { pool, calls } = nearMemoryFull();
  assert.equal(pool.allocate(NEAR, 2n ** 26n, 100_000, 0), null);
  assert.equal(calls.count, 1, "a slot past a whole block's size asks once");
  assert.equal(pool.allocate(NEAR, 2n ** 26n, 48), null, "fewer bytes: asked");
  assert.equal(calls.count, 3);
  const far = pool.allocate(NEAR, 2n ** 32n, 48);
  assert.ok(far, "the wider reach is served");
  assert.equal(calls.count, 4);
});

test("code pool: failed windows a little apart make one, and what lies between asks nothing", () => {
  const { pool, calls } = nearMemoryFull();
  const reach = 2n ** 26n;
  assert.equal(pool.allocate(NEAR - 2n ** 20n, reach, 48), null);
  assert.equal(pool.allocate(NEAR + 2n ** 20n, reach, 48), null);
  assert.equal(calls.count, 4);
  assert.equal(pool.allocate(NEAR, reach, 48), null, "an entry between the two");
  assert.equal(calls.count, 4, "no search made");
  assert.equal(pool.allocate(NEAR + 2n ** 21n, reach, 48), null, "one past both");
  assert.equal(calls.count, 6, "searched");
});

test("code pool: a block mapped inside a failed window forgets the failure, and its room is used first", () => {
  // A wider request lands next to NEAR: memory there was freed since the near search failed.
  const { pool, calls } = nearMemoryFull(() => NEAR + 2n ** 20n);
  const reach = 2n ** 26n;
  assert.equal(pool.allocate(NEAR, reach, 48), null);
  assert.equal(calls.count, 2);
  const wide = pool.allocate(NEAR, 2n ** 32n, 48)!;
  assert.equal(wide.address, NEAR + 2n ** 20n);
  assert.equal(calls.count, 3);
  const near = pool.allocate(NEAR, reach, 48);
  assert.equal(near?.block, wide.block, "served from the new block's room");
  assert.equal(calls.count, 3, "without asking");
  assert.equal(pool.allocate(NEAR, reach, 100_000), null, "too big for that block: asked, not refused");
  assert.equal(calls.count, 4);
});
