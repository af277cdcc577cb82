/**
 * The two atomic operations the process-wide registry (src/shared_registry.ts) needs on native
 * memory, as x86-64 code: compare-and-swap of a word, and an exchange that clears one. JS has no
 * atomics on memory it did not allocate that another isolate is guaranteed to see as atomic.
 */
import type { RegistryLockCode } from "../types.ts";

/** Where `clear` starts in the code. */
const CLEAR = 16;

/**
 * `cas(word, expected, desired) → previous` at offset 0 and `clear(word)` at `clear`. System V
 * passes the arguments in rdi, rsi, rdx; Windows in rcx, rdx, r8. `clear` also serves as a thread
 * exit destructor (`void (*)(void *)`): it writes nothing else.
 */
export function registryLock(os: string): RegistryLockCode {
  const cas = os === "windows"
    ? [
      0x48, 0x89, 0xd0, //             mov rax, rdx: the expected value
      0xf0, 0x4c, 0x0f, 0xb1, 0x01, // lock cmpxchg [rcx], r8: rax gets what was there
      0xc3, //                         ret
    ]
    : [
      0x48, 0x89, 0xf0, //             mov rax, rsi: the expected value
      0xf0, 0x48, 0x0f, 0xb1, 0x17, // lock cmpxchg [rdi], rdx: rax gets what was there
      0xc3, //                         ret
    ];
  const clear = [
    0x31, 0xc0, //                     xor eax, eax
    0x48, 0x87, os === "windows" ? 0x01 : 0x07, // xchg [rcx], rax (Windows) / xchg [rdi], rax: a full barrier
    0xc3, //                           ret
  ];
  const code = new Uint8Array(CLEAR + clear.length).fill(0xcc); // int3 between the two
  code.set(cas, 0);
  code.set(clear, CLEAR);
  return { code, clear: CLEAR };
}
