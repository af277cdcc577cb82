/**
 * Several stores into code made by one foreign call, one after another, with no JS run between
 * them. An entry too long for one store is written as a jump to itself, then its tail, then its
 * head; while it holds that jump, a call into the function waits there — on the JS thread too,
 * which then never comes back to write the head. JS run between the stores may call it (a
 * collection takes locks, V8's calls `getpid`; a JS replacement or FFI call reaching the
 * function): so no JS runs there. The routine is x86-64 System V code (Linux's `pwrite64` for
 * forced writes, else plain stores) or AArch64 code (plain stores, each flushed for instruction
 * fetch before the next).
 */
import { FLUSH_ROUTINE } from "./aarch64_flush.ts";
import type { NativeCall, Runtime, Store } from "./types.ts";

/**
 * `stores(descriptor) → offset`: the descriptor holds the file to `pwrite64` each store to (its
 * offset the store's address; the forced write of /proc/self/mem) or -1 for plain stores, at 0; a
 * word the routine sets at 8 to what the failed `pwrite64` returned; from 16, each store as its
 * address, length and the offset of its bytes in the descriptor (three words), a zero length
 * ending them. It returns the offset of the store it stopped at: the end when every one was made.
 * A plain store of 8 bytes is one `mov`, so a thread running the code sees the old word or the
 * new; a forced one is one copy by the kernel (which such a thread may see torn: `Os.protectFrom`,
 * so Linux forces only stores `mprotect` refuses). Uses only registers a call may clobber, and the
 * direction flag is clear at any call (System V).
 */
export const STORES_X86_64: readonly number[] = [
  0x49, 0x89, 0xf8, //             mov   r8, rdi: the descriptor
  0x4c, 0x8d, 0x4f, 0x10, //       lea   r9, [rdi+16]: the first store
  // next (7):
  0x49, 0x8b, 0x51, 0x08, //       mov   rdx, [r9+8]: its length
  0x48, 0x85, 0xd2, //             test  rdx, rdx
  0x74, 0x40, //                   jz    done (80): the end
  0x49, 0x8b, 0x71, 0x10, //       mov   rsi, [r9+16]
  0x4c, 0x01, 0xc6, //             add   rsi, r8: its bytes
  0x4d, 0x8b, 0x11, //             mov   r10, [r9]: its address
  0x49, 0x8b, 0x38, //             mov   rdi, [r8]: the file
  0x48, 0x85, 0xff, //             test  rdi, rdi
  0x78, 0x0e, //                   js    plain (48): none
  0xb8, 0x12, 0x00, 0x00, 0x00, // mov   eax, 18: pwrite64(rdi, rsi, rdx, r10)
  0x0f, 0x05, //                   syscall: keeps all but rax, rcx, r11
  0x48, 0x39, 0xd0, //             cmp   rax, rdx
  0x75, 0x1e, //                   jne   failed (76): refused, or only partly taken
  0xeb, 0x16, //                   jmp   advance (70)
  // plain (48):
  0x48, 0x83, 0xfa, 0x08, //       cmp   rdx, 8
  0x75, 0x08, //                   jne   copy (62)
  0x48, 0x8b, 0x06, //             mov   rax, [rsi]
  0x49, 0x89, 0x02, //             mov   [r10], rax: the word in one store
  0xeb, 0x08, //                   jmp   advance (70)
  // copy (62):
  0x4c, 0x89, 0xd7, //             mov   rdi, r10
  0x48, 0x89, 0xd1, //             mov   rcx, rdx
  0xf3, 0xa4, //                   rep movsb
  // advance (70):
  0x49, 0x83, 0xc1, 0x18, //       add   r9, 24
  0xeb, 0xbb, //                   jmp   next (7)
  // failed (76):
  0x49, 0x89, 0x40, 0x08, //       mov   [r8+8], rax
  // done (80):
  0x4c, 0x89, 0xc8, //             mov   rax, r9
  0x4c, 0x29, 0xc0, //             sub   rax, r8
  0xc3, //                         ret
];

/**
 * `STORES_X86_64` for AArch64, plain stores only (its Linux layer makes no forced writes): the
 * file at 0 is not read. After each store the routine flushes its bytes for instruction fetch with
 * `FLUSH_ROUTINE`, placed right after it, which uses x0–x4 only; this code keeps to x5–x12 and
 * keeps its return address in x9 meanwhile. It begins with a landing pad, for pages that BTI
 * guards, and returns with `ret`, which BTI does not check.
 */
export const STORES_AARCH64: readonly number[] = [
  0xd503245f, //  0 bti   c
  0xaa0003e5, //  4 mov   x5, x0: the descriptor
  0xaa1e03e9, //  8 mov   x9, x30
  0x91004006, // 12 add   x6, x0, #16: the first store
  0xf94004c7, // 16 next: ldr x7, [x6, #8]: its length
  0xb4000287, // 20 cbz   x7, done (100): the end
  0xf94008c8, // 24 ldr   x8, [x6, #16]
  0x8b050108, // 28 add   x8, x8, x5: its bytes
  0xf94000ca, // 32 ldr   x10, [x6]: its address
  0xf10020ff, // 36 cmp   x7, #8
  0x54000081, // 40 b.ne  copy (56)
  0xf940010b, // 44 ldr   x11, [x8]
  0xf900014b, // 48 str   x11, [x10]: the word in one store
  0x14000007, // 52 b     flush_it (80)
  0xd280000b, // 56 copy: mov x11, #0
  0x386b690c, // 60 byte: ldrb w12, [x8, x11]
  0x382b694c, // 64 strb  w12, [x10, x11]
  0x9100056b, // 68 add   x11, x11, #1
  0xeb07017f, // 72 cmp   x11, x7
  0x54ffff83, // 76 b.lo  byte (60)
  0xaa0a03e0, // 80 flush_it: mov x0, x10
  0x8b070141, // 84 add   x1, x10, x7
  0x94000006, // 88 bl    flush (112)
  0x910060c6, // 92 add   x6, x6, #24
  0x17ffffec, // 96 b     next (16)
  0xcb0500c0, // 100 done: sub x0, x6, x5
  0xaa0903fe, // 104 mov  x30, x9
  0xd65f03c0, // 108 ret
  ...FLUSH_ROUTINE, // 112 flush
];

/** The routine for `arch` (`Runtime.arch`) as bytes. */
export function storesCode(arch: string): Uint8Array {
  if (arch !== "aarch64" && arch !== "arm64") return Uint8Array.from(STORES_X86_64);
  const bytes = new Uint8Array(STORES_AARCH64.length * 4);
  const view = new DataView(bytes.buffer);
  STORES_AARCH64.forEach((word, i) => view.setUint32(i * 4, word, true));
  return bytes;
}

/** Where the stores start in a descriptor, and how many bytes each takes there. */
const FIRST = 16;
const STORE = 24;

/** What a sequence came to: how many stores were made, and, for a forced one refused, what `pwrite64` returned (-errno, or the bytes it took). */
export interface StoresMade {
  readonly made: number;
  readonly result: number;
}

/** Makes a sequence of stores: through `file` (-1: plain stores). */
export type StoresInOrder = (stores: readonly Store[], file: number) => StoresMade;

/**
 * The routine, placed where `place` puts code (it returns the address the code runs at) on the
 * first sequence, and a caller for it.
 */
export function storesInOrder(runtime: Runtime, place: (code: Uint8Array) => bigint): StoresInOrder {
  let routine: NativeCall | null = null;
  return (stores, file) => {
    routine ??= runtime.fnPointer(place(storesCode(runtime.arch)), { parameters: ["buffer"], result: "isize" });
    let size = FIRST + STORE * (stores.length + 1);
    const data = size;
    for (const store of stores) size += store.bytes.length;
    const descriptor = new Uint8Array(size);
    const fields = new DataView(descriptor.buffer);
    fields.setBigInt64(0, BigInt(file), true);
    let at = data;
    for (let i = 0; i < stores.length; i++) {
      const { address, bytes } = stores[i]!;
      if (bytes.length === 0) throw new RangeError("a store of no bytes would end the sequence");
      const entry = FIRST + STORE * i;
      fields.setBigUint64(entry, address, true);
      fields.setBigUint64(entry + 8, BigInt(bytes.length), true);
      fields.setBigUint64(entry + 16, BigInt(at), true);
      descriptor.set(bytes, at);
      at += bytes.length;
    }
    const reached = Number(routine(descriptor));
    return { made: (reached - FIRST) / STORE, result: Number(fields.getBigInt64(8, true)) };
  };
}
