/**
 * The two atomic operations the process-wide registry (src/shared_registry.ts) needs on native
 * memory, as AArch64 code: compare-and-swap of a word (an exclusive-load/store loop: ARMv8.0 has
 * no single-instruction CAS), and a release store that clears one.
 */
import type { RegistryLockCode } from "../types.ts";
import { assemble } from "./writer.ts";

/** Where `clear` starts in the code. */
const CLEAR = 40;

/**
 * `cas(word, expected, desired) → previous` at offset 0 and `clear(word)` at `clear`; x0–x2 carry
 * the arguments on Linux, Windows and macOS alike. `clear` also serves as a thread exit destructor
 * (`void (*)(void *)`).
 */
export function registryLock(_os: string): RegistryLockCode {
  return {
    code: assemble([
      0xaa0003e3, //  0 mov x3, x0: the word
      0xc85ffc60, //  4 loop: ldaxr x0, [x3]
      0xeb01001f, //  8 cmp x0, x1
      0x54000081, // 12 b.ne differs
      0xc804fc62, // 16 stlxr w4, x2, [x3]
      0x35ffff84, // 20 cbnz w4, loop: the store lost its exclusivity, try again
      0xd65f03c0, // 24 ret
      0xd5033f5f, // 28 differs: clrex
      0xd65f03c0, // 32 ret
      0xd503201f, // 36 nop
      0xc89ffc1f, // 40 clear: stlr xzr, [x0]
      0xd65f03c0, // 44 ret
    ]),
    clear: CLEAR,
  };
}
