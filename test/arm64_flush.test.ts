// The arm64 instruction-cache flush: the routine redefine writes itself when libgcc's
// __clear_cache is missing, checked word by word against objdump everywhere, and run for real on
// arm64 (under qemu it cannot prove the caches get flushed, only that the routine runs and returns).
import { assert, test } from "./harness.ts";
import { assertDisassembly, h } from "./objdump_aarch64.ts";
import { aarch64CacheFlush, FLUSH_ROUTINE, flushRoutineBytes } from "../platform/aarch64_flush.ts";
import { assemble, os, runtime } from "./native.ts";

const isArm64 = runtime.arch === "aarch64" || runtime.arch === "arm64";

test("arm64 flush routine: dc cvau / dsb ish / ic ivau / dsb ish / isb, line sizes from ctr_el0", () => {
  const at = 0x10000n;
  const bytes = flushRoutineBytes();
  assert.equal(bytes.length, FLUSH_ROUTINE.length * 4);
  assertDisassembly(bytes, at, [
    "mrs x2, ctr_el0",
    `tbnz w2, #28, ${h(at + 0x2cn)}`,
    "ubfx x3, x2, #16, #4",
    "mov x4, #0x4",
    "lsl x3, x4, x3",
    "sub x4, x3, #0x1",
    "bic x4, x0, x4",
    "dc cvau, x4",
    "add x4, x4, x3",
    "cmp x4, x1",
    `b.cc ${h(at + 0x1cn)}`,
    "dsb ish",
    `tbnz w2, #29, ${h(at + 0x5cn)}`,
    "and x3, x2, #0xf",
    "mov x4, #0x4",
    "lsl x3, x4, x3",
    "sub x4, x3, #0x1",
    "bic x4, x0, x4",
    "ic ivau, x4",
    "add x4, x4, x3",
    "cmp x4, x1",
    `b.cc ${h(at + 0x48n)}`,
    "dsb ish",
    "isb",
    "ret",
  ]);
});

if (isArm64) {
  test("arm64 flush: __clear_cache from libgcc_s when it loads, the own routine when it does not", () => {
    assert.equal(aarch64CacheFlush(runtime, os.pageSize).source, "__clear_cache");
    const fallback = aarch64CacheFlush(runtime, os.pageSize, "libno-such-gcc.so.1");
    assert.equal(fallback.source, "own routine");
    // Code written into a page, flushed by each, then run: the flushes return and the code runs.
    const { address, base } = assemble([0x20, 0x00, 0x80, 0xd2, 0xc0, 0x03, 0x5f, 0xd6]); // mov x0, #1; ret
    const one = runtime.fnPointer(address, { parameters: [], result: "u64" });
    for (const flush of [aarch64CacheFlush(runtime, os.pageSize).flush, fallback.flush]) {
      flush(address, 8);
      flush(base + 3n, 2 * os.pageSize - 3); // unaligned ends, two pages
      flush(address, 0);
      assert.equal(one(), 1n);
    }
  });
}
