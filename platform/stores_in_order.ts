/**
 * Several stores into code made by one foreign call, one after another, with no JS run between
 * them. An entry too long for one store is written as a jump to itself, then its tail, then its
 * head; while it holds that jump, a call into the function waits there — on the JS thread too,
 * which then never comes back to write the head. JS run between the stores may call it (a V8
 * collection calls `getpid`; a JS replacement or FFI call reaching the function): so no JS runs
 * there. The routine is x86-64 System V code: Linux's `pwrite64` for forced writes, else plain
 * stores.
 */
import type { NativeCall, Runtime, Store } from "./types.ts";

/**
 * `stores(descriptor) → offset`: the descriptor holds the file to `pwrite64` each store to (its
 * offset the store's address; the forced write of /proc/self/mem) or -1 for plain stores, at 0; a
 * word the routine sets at 8 to what the failed `pwrite64` returned; from 16, each store as its
 * address, length and the offset of its bytes in the descriptor (three words), a zero length
 * ending them. It returns the offset of the store it stopped at: the end when every one was made.
 * A plain store of 8 bytes is one `mov`, so a thread running the code sees the old word or the
 * new; a forced one is one copy by the kernel. Uses only registers a call may clobber, and the
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
    routine ??= runtime.fnPointer(place(Uint8Array.from(STORES_X86_64)), { parameters: ["buffer"], result: "isize" });
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
