// Every write of code is followed by an instruction-cache flush over exactly the bytes written.
// qemu keeps self-modifying code coherent by itself (and x86-64 hardware does too), so a missing
// flush would pass every other test: this one watches the platform layer's `os.flushCode` instead.
import { assert, test } from "./harness.ts";
import { type Patch, redefine } from "../mod.ts";
import { platform } from "../platform/mod.ts";
import { CodePool, writeCode } from "../src/code_memory.ts";
import type { CodeSlot } from "../src/code_memory.ts";
import { archFor } from "../src/arch/mod.ts";
import { redefineToOriginal } from "../src/internal.ts";
import { assemble, bytesAt, libc, mapPages, os, protectionAt, unassemble } from "./native.ts";
import { PROT_EXEC, PROT_READ, PROT_WRITE } from "../platform/mod.ts";

const MAP_SHARED = 0x01;
const MAP_FIXED = 0x10;
const MAP_ANONYMOUS = 0x20;

type Event =
  | { kind: "pool write"; address: bigint; bytes: Uint8Array }
  | { kind: "flush"; address: bigint; length: number; bytes: Uint8Array; protection: number };

/** Runs `body` with `os.flushCode` and `CodePool.prototype.write` watched, then puts both back. */
function watch(body: () => void): Event[] {
  const events: Event[] = [];
  const flushCode = os.flushCode;
  const poolWrite = Object.getOwnPropertyDescriptor(CodePool.prototype, "write")!;
  os.flushCode = (address, length) => {
    // What the flushed range holds at the moment of the flush: the write must be complete.
    events.push({ kind: "flush", address, length, bytes: bytesAt(address, length), protection: protectionAt(address) });
    flushCode.call(os, address, length);
  };
  CodePool.prototype.write = function (this: CodePool, slot: CodeSlot, bytes: Uint8Array) {
    events.push({ kind: "pool write", address: slot.address, bytes: bytes.slice() });
    return poolWrite.value.call(this, slot, bytes);
  };
  try {
    body();
  } finally {
    os.flushCode = flushCode;
    Object.defineProperty(CodePool.prototype, "write", poolWrite);
  }
  return events;
}

/** Every pool write is flushed at once, over exactly its bytes; returns the other flushes. */
function checkPoolWrites(events: Event[]): Extract<Event, { kind: "flush" }>[] {
  const others: Extract<Event, { kind: "flush" }>[] = [];
  for (let i = 0; i < events.length; i++) {
    const event = events[i];
    if (event.kind === "flush") {
      others.push(event);
      continue;
    }
    const next = events[++i];
    assert.ok(next?.kind === "flush", `the pool write at ${event.address.toString(16)} is flushed next`);
    assert.equal(next.address, event.address, "flushed from the first byte written");
    assert.equal(next.length, event.bytes.length, "flushed to the last byte written");
    assert.deepEqual(next.bytes, event.bytes, "flushed after the bytes were in place");
  }
  return others;
}

test("flush: a code pool write is flushed over exactly its bytes, where the code runs", () => {
  const pool = new CodePool(platform());
  const near = os.symbolAddress("labs");
  const slot = pool.allocate(near, 2n ** 26n, 40)!;
  assert.ok(slot, "near memory for a slot");
  const bytes = Uint8Array.from({ length: 40 }, (_, i) => 0x10 + i);
  const events = watch(() => pool.write(slot, bytes));
  assert.deepEqual(events.map((e) => e.kind), ["pool write", "flush"]);
  assert.deepEqual(checkPoolWrites(events), []);
});

test("flush: writeCode flushes each write into code over exactly its bytes, after restoring protection", () => {
  const { address, base } = assemble(new Array(64).fill(0));
  try {
    const writes = [
      { address, bytes: Uint8Array.of(1, 2, 3, 4) }, // one aligned word: the atomic store
      { address: address + 21n, bytes: Uint8Array.of(5, 6, 7, 8, 9, 10, 11, 12, 13) }, // across words
    ];
    const events = watch(() => writeCode(platform(), writes));
    assert.deepEqual(
      events.map((e) => e.kind === "flush" && [e.address - address, e.length, Array.from(e.bytes), e.protection]),
      writes.map((w) => [w.address - address, w.bytes.length, Array.from(w.bytes), PROT_READ | PROT_EXEC]),
    );
  } finally {
    unassemble(base);
  }
});

test("flush: a write from a writable data page onto a writable executable one is flushed", () => {
  // Neither page needs a protection change, and the first is not code: the second still is.
  // The data page is a shared mapping, the code page a private one, so that they stay two mappings
  // in every memory map: qemu-user 7.2 gives a guest's read+write+execute page no host execute,
  // the host merges it with a private read+write neighbour, and qemu lists the merged mapping with
  // its first page's protection, "rw-p" for both (measured, with 4 and 16 KiB guest pages).
  const base = mapPages(2);
  const page = BigInt(os.pageSize);
  try {
    const shared = libc.mmap(base, page, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, -1, 0n);
    assert.equal(shared, base, "first page mapped shared");
    assert.equal(libc.mprotect(base + page, page, PROT_READ | PROT_WRITE | PROT_EXEC), 0, "second page made RWX");
    assert.equal(protectionAt(base), PROT_READ | PROT_WRITE, "the memory map says the first page is data");
    assert.equal(protectionAt(base + page), PROT_READ | PROT_WRITE | PROT_EXEC, "the memory map says the second is RWX");
    const write = { address: base + page - 4n, bytes: Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8) };
    const events = watch(() => writeCode(platform(), [write]));
    assert.deepEqual(
      events.map((e) => e.kind === "flush" && [e.address, e.length, Array.from(e.bytes)]),
      [[write.address, 8, Array.from(write.bytes)]],
    );
  } finally {
    libc.munmap(base, 2n * page);
  }
});

test("flush: a live entry written in several stores (spin first) is flushed after each, then whole", () => {
  const arch = archFor(platform().runtime.arch);
  const { address, base } = assemble(new Array(64).fill(0));
  try {
    // Sixteen bytes from the second word of an aligned 8-byte word: no single store covers them.
    const at = address + 4n;
    const bytes = Uint8Array.from({ length: 16 }, (_, i) => 0x40 + i);
    const { storeInOrder } = os;
    const sequences: [bigint, number[]][][] = [];
    if (storeInOrder) {
      // Those that made stores: arm64's layer, which has no forced writes, refuses those first.
      os.storeInOrder = (stores, forced) => {
        const made = storeInOrder(stores, forced);
        if (made > 0) sequences.push(stores.map((s) => [s.address - at, Array.from(s.bytes)]));
        return made;
      };
    }
    let events: Event[];
    try {
      events = watch(() => writeCode(platform(), [{ address: at, bytes, spin: arch.selfLoop }]));
    } finally {
      if (storeInOrder) os.storeInOrder = storeInOrder;
    }
    const whole = [0n, bytes.length, Array.from(bytes)]; // the whole write, once complete
    const flushes = events.map((e) => e.kind === "flush" && [e.address - at, e.length, Array.from(e.bytes)]);
    if (storeInOrder) {
      // The layer's routine makes the three stores in one call, flushing each itself where the
      // CPU needs it: the spin into the word as it was, the tail, then the head's word.
      const zeros = [0, 0, 0, 0];
      assert.deepEqual(sequences, [[
        [-4n, [...zeros, ...arch.selfLoop, ...zeros.slice(arch.selfLoop.length)]],
        [BigInt(arch.selfLoop.length), Array.from(bytes.subarray(arch.selfLoop.length))],
        [-4n, [...zeros, ...bytes.subarray(0, 4)]],
      ]]);
      assert.deepEqual(flushes, [whole]);
    } else {
      const spun = Uint8Array.of(...arch.selfLoop, ...bytes.subarray(arch.selfLoop.length));
      assert.deepEqual(flushes, [
        [0n, arch.selfLoop.length, Array.from(arch.selfLoop)], // the spin, before the tail is written
        [0n, bytes.length, Array.from(spun)], //                  the tail, before the head replaces the spin
        whole,
      ]);
    }
  } finally {
    unassemble(base);
  }
});

test("flush: redefine and restore flush every stub they write and the entry, exactly", () => {
  const arch = archFor(platform().runtime.arch);
  const address = os.symbolAddress("labs");
  const before = bytesAt(address, 64);
  // A fresh stub, written and flushed: labs redefined with a JS replacement earlier in this
  // process (another file, under bun) left its slot to be taken back with its code in place,
  // which a patch laid out another way, restored since, replaces (src/layout.ts `reserveAgain`).
  redefineToOriginal({ symbol: "labs", parameters: [], result: "void" }).restore();
  let patch: Patch<readonly ["i64"], "i64"> | undefined;
  const applying = watch(() => {
    patch = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => x + 1n);
  });
  assert.equal(libc.labs(-7n), -6n);
  const patchedAddress = patch!.patchedAddress;
  const during = bytesAt(address, 64);
  const entry = checkPoolWrites(applying);
  assert.ok(applying.some((e) => e.kind === "pool write"), "a JS replacement needs a stub in the pool");
  assert.equal(entry.length, 1, "one flush besides the pool's: the entry");
  const at = Number(patchedAddress - address);
  assert.equal(entry[0].address, patchedAddress, "flushed from the first byte of the entry jump");
  assert.equal(entry[0].length, arch.entryJumps[0].size, "flushed to its last byte");
  assert.deepEqual(entry[0].bytes, during.subarray(at, at + arch.entryJumps[0].size), "after the jump was in place");
  for (let i = 0; i < 64; i++) {
    if (before[i] !== during[i]) assert.ok(i >= at && i < at + arch.entryJumps[0].size, `byte ${i} changed unflushed`);
  }

  const restoring = watch(() => patch!.restore());
  assert.deepEqual(bytesAt(address, 64), before);
  assert.deepEqual(
    restoring.map((e) => e.kind === "flush" && [e.address, e.length, Array.from(e.bytes)]),
    [[patchedAddress, arch.entryJumps[0].size, Array.from(before.subarray(at, at + arch.entryJumps[0].size))]],
    "restore flushes the original bytes it put back, and nothing else is written",
  );
});
