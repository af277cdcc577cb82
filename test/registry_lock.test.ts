// The process-wide registry's compare-and-swap and clear (src/arch/*/registry_lock.ts): arm64's read
// back with objdump (pure: runs anywhere; x86-64's in test/x86_64_guard.test.ts, beside its
// disassembler), and this machine's run for real.
import { assert, test } from "./harness.ts";
import { assertDisassembly } from "./objdump_aarch64.ts";
import { registryLock as arm64 } from "../src/arch/aarch64/registry_lock.ts";
import { machine } from "../src/registry.ts";
import { runCase } from "./cases.ts";

test("registry lock (arm64): an exclusive load/store loop, clear by a release store", () => {
  const { code, clear } = arm64("linux");
  assert.equal(clear, 40);
  assertDisassembly(code, 0x1000n, [
    "mov x3, x0",
    "ldaxr x0, [x3]",
    "cmp x0, x1",
    "b.ne 0x101c",
    "stlxr w4, x2, [x3]",
    "cbnz w4, 0x1004",
    "ret",
    "clrex",
    "ret",
    "nop",
    "stlr xzr, [x0]",
    "ret",
  ]);
});

test("registry lock: run here, cas swaps only on the expected value and clear zeroes the word", () => {
  const m = machine();
  const { code, clear } = m.arch.registryLock(m.platform.runtime.os);
  const slot = m.pool.allocate(0n, 2n ** 62n, code.length, 16)!;
  m.pool.write(slot, code);
  const { runtime } = m.platform;
  const cas = runtime.fnPointer(slot.address, { parameters: ["usize", "u64", "u64"], result: "u64" });
  const clearWord = runtime.fnPointer(slot.address + BigInt(clear), { parameters: ["usize"], result: "void" });
  const word = new DataView(runtime.view(slot.data, 8).buffer, runtime.view(slot.data, 8).byteOffset, 8);
  word.setBigUint64(0, 0n, true);
  assert.equal(BigInt(cas(slot.data, 0n, 7n)), 0n, "swapped: it held 0");
  assert.equal(word.getBigUint64(0, true), 7n);
  assert.equal(BigInt(cas(slot.data, 0n, 9n)), 7n, "not swapped: it held 7");
  assert.equal(word.getBigUint64(0, true), 7n);
  clearWord(slot.data);
  assert.equal(word.getBigUint64(0, true), 0n);
  m.pool.release(slot, null);
});

test("a lock whose lazy binding throws leaves no section open: holding() false, later sections lock and patch", () => {
  const seen = runCase(new URL("./fixtures/lock_throws.ts", import.meta.url), "the lock's binding throws once");
  assert.deepEqual(seen, { errors: ["binding failed"], holding: false, active: true, restored: true });
}, { skip: machine().platform.runtime.slowPointerCalls ? undefined : "only where pointer calls are slow is the lock bound lazily" });
