// The process-wide registry's compare-and-swap and clear (src/arch/*/registry_lock.ts), read back
// with the reference disassemblers (pure: runs anywhere), and run for real on this machine.
import { assert, test } from "./harness.ts";
import { Decoder, DecoderOptions, FastFormatter } from "iced-x86";
import { assertDisassembly } from "./objdump_aarch64.ts";
import { registryLock as x86 } from "../src/arch/x86_64/registry_lock.ts";
import { registryLock as arm64 } from "../src/arch/aarch64/registry_lock.ts";
import { machine } from "../src/registry.ts";

function disassemble(code: Uint8Array, offset: number, count: number): string[] {
  const decoder = new Decoder(64, code.subarray(offset), DecoderOptions.None);
  const formatter = new FastFormatter();
  const lines: string[] = [];
  while (lines.length < count) lines.push(formatter.format(decoder.decode()));
  decoder.free();
  formatter.free();
  return lines;
}

test("registry lock (x86-64): lock cmpxchg in System V and Windows registers, clear by xchg", () => {
  const linux = x86("linux"), windows = x86("windows");
  assert.deepEqual(disassemble(linux.code, 0, 3), ["mov rax,rsi", "lock cmpxchg [rdi],rdx", "ret"]);
  assert.deepEqual(disassemble(linux.code, linux.clear, 3), ["xor eax,eax", "xchg [rdi],rax", "ret"]);
  assert.deepEqual(disassemble(windows.code, 0, 3), ["mov rax,rdx", "lock cmpxchg [rcx],r8", "ret"]);
  assert.deepEqual(disassemble(windows.code, windows.clear, 3), ["xor eax,eax", "xchg [rcx],rax", "ret"]);
});

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
