/**
 * The AArch64 instruction set: `b imm26` entry jumps, `adrp x16; add; br x16` ones for ±4 GiB,
 * `ldr x16, #8; br x16` absolute ones, and the relocator for the words they overwrite.
 */
import { ANYWHERE, type Arch } from "../types.ts";
import { displacement, isBranchKind, kindOf } from "./decoder.ts";
import { planRelocation, relocate } from "./relocator.ts";
import { GUARD_DATA_SIZE, GUARD_SIZE, guardStub, returnAddressReader, threadPointerReader } from "./guard.ts";
import { registryLock } from "./registry_lock.ts";
import { cannedCode } from "./canned.ts";
import { probe } from "./probe.ts";
import {
  assemble,
  b,
  B_REACH,
  B_SIZE,
  JUMP_ABS_SIZE,
  JUMP_INDIRECT_SIZE,
  JUMP_PAGE_REACH,
  JUMP_PAGE_SIZE,
  jumpAbs,
  jumpIndirect,
  jumpPage,
} from "./writer.ts";

/**
 * AArch64 for `src/`. A leading `bti` or `paciasp`/`pacibsp` (which also serve as landing pads)
 * stays in place: indirect calls into guarded pages must land on one. The entry jumps that go
 * through x16 (`br x16`) land on our stubs, in pages mapped without PROT_BTI, where any
 * instruction may be a branch's target (in a guarded page, a `br` through x16 or x17 may land on
 * `bti c`, as a call does, so a stub that began with one would still be reachable).
 *
 * The branches we write that enter a library's code: the entry jump's `b` and every relocated
 * branch in reach are direct, which BTI does not check. The trampoline's far ones (the jump back
 * into the middle of the function, a moved `b`/`bl`/`b.cond`/`cbz`/`tbz` out of reach) land where
 * no landing pad is, so into guarded code they go by `ret x16` (see relocator.ts); the native
 * probe's copy of the moved words is relocated the same way. Every other indirect branch lands on
 * our own pages or on a function's entry: the guard's and the probe's way to the original (the
 * trampoline, or the patch below), the guard's call of the JS callback, canned code's call of the
 * real clock (its trampoline, or the exported entry), a jump stub's to a native replacement (a
 * function pointer, whose code, if built for BTI, starts with a landing pad).
 *
 * @example
 * ```ts
 * import { aarch64 } from "./mod.ts";
 * const jump = aarch64.entryJumps[0].encode(0x10000n, 0x20000n); // b 0x20000
 * if (jump?.join() !== "0,64,0,20") throw new Error("expected the word 0x14004000");
 * ```
 */
export const aarch64: Arch = {
  name: "aarch64",
  entryJumps: [
    {
      size: B_SIZE,
      reach: B_REACH,
      encode(from: bigint, to: bigint): Uint8Array | null {
        const word = b(from, to);
        return word === null ? null : assemble([word]);
      },
    },
    // Where qemu-user's or a big runtime's mappings fill the ±128 MiB around a library, 12 bytes:
    // functions of 12 to 15 bytes (libc's `labs`) have no room for the absolute jump.
    { size: JUMP_PAGE_SIZE, reach: JUMP_PAGE_REACH, encode: jumpPage },
    { size: JUMP_ABS_SIZE, reach: ANYWHERE, encode: (_from, to) => jumpAbs(to) },
  ],
  selfLoop: Uint8Array.of(0x00, 0x00, 0x00, 0x14), // b .
  landingPadLength(code: Uint8Array): number {
    return code.length >= 4 && kindOf(words(code).getUint32(0, true)) === "landingPad" ? 4 : 0;
  },
  planRelocation,
  relocate,
  straightLineLength(code: Uint8Array, _address: bigint): number {
    const view = words(code);
    let offset = 0;
    while (offset + 4 <= code.length) {
      const kind = kindOf(view.getUint32(offset, true));
      offset += 4;
      if (kind === "ret" || kind === "br" || kind === "b" || kind === "udf") break;
    }
    return offset;
  },
  branchesInto(code: Uint8Array, address: bigint, from: bigint, to: bigint): bigint[] {
    // Offsets from code[0] in plain numbers: a branch reaches ±128 MiB, and user-space code sits
    // far from both ends of the address space, so no target wraps around it.
    const lo = Number(from - address), hi = Number(to - address);
    const view = words(code);
    const found: bigint[] = [];
    for (let offset = 0; offset + 4 <= code.length; offset += 4) {
      const word = view.getUint32(offset, true);
      const kind = kindOf(word);
      if (!isBranchKind(kind)) continue;
      const target = offset + displacement(word, kind);
      if (target > lo && target < hi) found.push(address + BigInt(offset));
    }
    return found;
  },
  startsInstruction(_code: Uint8Array, _address: bigint, offset: number): boolean {
    return offset % 4 === 0;
  },
  indirectJumpSize: JUMP_INDIRECT_SIZE,
  indirectJump: jumpIndirect,
  registryLock,
  canned: cannedCode,
  guard: {
    layout: () => ({ size: GUARD_SIZE, dataSize: GUARD_DATA_SIZE, busyOffset: 8, shared: null }),
    threadPointerReader,
    returnAddressReader,
    encode: guardStub,
    data: (_options, into) => into.fill(0, 0, GUARD_DATA_SIZE),
  },
  probe,
};

/** The words of `code`, read little-endian. */
function words(code: Uint8Array): DataView {
  return new DataView(code.buffer, code.byteOffset, code.byteLength);
}
