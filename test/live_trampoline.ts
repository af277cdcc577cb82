/**
 * Runs a relocated copy for real: a hand-assembled function is relocated into fresh pages and its
 * trampoline called, so a test sees what the moved instructions compute there (a return address
 * read back, for one), not only how they disassemble.
 */
import type { Arch } from "../src/arch/types.ts";
import { PROT_EXEC, PROT_READ } from "../platform/mod.ts";
import { assemble, bytesAt, libc, mapPages, os, runtime, unassemble } from "./native.ts";

/**
 * Places `code` (a function taking nothing and returning a 64-bit value), relocates its first
 * `minLength` bytes with `arch` into a fresh page, calls the trampoline and returns its result,
 * with the function's address.
 */
export function runRelocated(arch: Arch, code: number[], minLength: number): { result: bigint; address: bigint } {
  const fn = assemble(code);
  const trampoline = mapPages(1);
  try {
    const plan = arch.planRelocation(bytesAt(fn.address, code.length), fn.address, minLength);
    const out = arch.relocate(plan, trampoline);
    runtime.view(trampoline, out.length).set(out);
    if (libc.mprotect(trampoline, BigInt(os.pageSize), PROT_READ | PROT_EXEC) !== 0) throw new Error("mprotect failed");
    os.flushCode(trampoline, out.length);
    const result = runtime.fnPointer(trampoline, { parameters: [], result: "u64" })() as bigint;
    return { result: BigInt(result), address: fn.address };
  } finally {
    libc.munmap(trampoline, BigInt(os.pageSize));
    unassemble(fn.base);
  }
}
