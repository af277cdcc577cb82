/**
 * The guard stub that stands in front of a JS replacement (AArch64), with the contract of
 * src/arch/x86_64/guard.ts: calls from other threads (or from any, once the isolate's identity word
 * is 0), calls from the JS thread while the replacement is already running, and every call once
 * the patch is retired go to the original. It calls the replacement with `blr` (so its
 * return stays predicted) after keeping the caller's return address (x30) in a per-patch slot, and
 * clears its busy flag when the replacement returns. A call pushes nothing on AArch64, so stack
 * arguments stay where the callee expects them, whatever the signature.
 *
 * It writes only x16 and x17 (the intra-procedure-call scratch registers, which any veneer or PLT
 * entry may clobber) and x30 (the link register, which the caller gave up by calling). Arguments
 * in x0–x7, v0–v7 and x8 (the indirect result), and the results in x0–x1 and v0–v3, pass untouched;
 * the condition flags too (`eor` + `cbnz`, not `cmp`).
 */
import type { GuardOptions } from "../types.ts";
import { RedefineError } from "../../errors.ts";
import { adrp, assemble, blr, br, cbz, ldrLiteral, NOP } from "./writer.ts";

/** Bytes of code (with its three literals). */
export const GUARD_SIZE = 120;
/** Bytes of read+write data: the saved return address, then the busy flag. */
export const GUARD_DATA_SIZE = 16;

/**
 * The thread's identity into `rd`, two words: glibc's thread pointer is `tpidr_el0`; Windows keeps
 * the TEB in x18, the platform register; macOS keeps its thread-specific data base in
 * `tpidrro_el0`, whose low three bits held the CPU number in some versions (not run on a Mac). The
 * low bits are cleared everywhere: the others are aligned anyway.
 */
function threadPointer(os: string, rd: number): number[] {
  const read = {
    linux: 0xd53bd040, //   mrs xd, tpidr_el0
    windows: 0xaa1203e0, // mov xd, x18
    darwin: 0xd53bd060, //  mrs xd, tpidrro_el0
  }[os];
  if (read === undefined) {
    throw new RedefineError(
      "UNSUPPORTED_PLATFORM",
      `the aarch64 guard stub does not know where '${os}' keeps the thread pointer.`,
    );
  }
  return [
    (read | rd) >>> 0,
    (0x927df000 | (rd << 5) | rd) >>> 0, // and xd, xd, #~7
  ];
}

/** A function returning the current thread's pointer, read exactly as the guard reads it. */
export function threadPointerReader(os: string): Uint8Array {
  return assemble([
    ...threadPointer(os, 0), // mrs x0, tpidr_el0; and x0, x0, #~7
    0xd65f03c0, //              ret
  ]);
}

/** `add xd, xn, #imm12`. */
function addImmediate(rd: number, rn: number, imm12: number): number {
  return (0x91000000 | (imm12 << 10) | (rn << 5) | rd) >>> 0;
}

/** The guard's bytes for `options`. */
export function guardStub(options: GuardOptions): Uint8Array {
  const { at, data } = options;
  const X16 = 16, X17 = 17;
  const IDENTITY = 96, CALLBACK = 104, ORIGINAL = 112, TO_ORIGINAL = 88;
  const pc = (offset: number) => at + BigInt(offset);
  const reach = <T>(value: T | null): T => {
    if (value === null) throw new RangeError("guard data or literal out of pc-relative reach");
    return value;
  };
  // x17 = data: adrp gives its 4 KiB page (±4 GiB), add the offset within the page.
  const dataAddress = (offset: number) => [
    reach(adrp(X17, pc(offset), data)),
    addImmediate(X17, X17, Number(data % 4096n)),
  ];
  const toOriginal = (offset: number, sf: boolean) =>
    reach(cbz({ nonzero: true, sf, rt: X16 }, pc(offset), pc(TO_ORIGINAL)));
  if (data % 8n !== 0n) throw new RangeError("guard data must be 8-byte aligned");
  const words = [
    ...threadPointer(options.os, X16), //          0 mrs x16, tpidr_el0; and x16, x16, #~7
    reach(ldrLiteral("x", X17, pc(8), pc(IDENTITY))), // 8 ldr x17, identity: the word's address
    0xf9400231, //                                12 ldr x17, [x17]: the JS thread, 0 once the isolate ended
    0xca110210, //                                16 eor x16, x16, x17
    toOriginal(20, true), //                      20 cbnz x16, to_original: another thread
    ...dataAddress(24), //                        24 adrp x17, data; add x17, x17, :lo12:data
    0x39402230, //                                32 ldrb w16, [x17, #8]
    toOriginal(36, false), //                     36 cbnz w16, to_original: re-entered, or retired
    0x52800030, //                                40 mov w16, #1
    0x39002230, //                                44 strb w16, [x17, #8]: busy
    0xf900023e, //                                48 str x30, [x17]: the caller's return address
    reach(ldrLiteral("x", X16, pc(52), pc(CALLBACK))), // 52 ldr x16, callback
    blr(X16), //                                  56 blr x16
    ...dataAddress(60), //                        60 adrp x17, data; add x17, x17, :lo12:data
    0x39402230, //                                68 ldrb w16, [x17, #8]
    0x121f0210, //                                72 and w16, w16, #2: not running (retired stays)
    0x39002230, //                                76 strb w16, [x17, #8]
    0xf940023e, //                                80 ldr x30, [x17]
    0xd65f03c0, //                                84 ret: back to the caller
    reach(ldrLiteral("x", X16, pc(TO_ORIGINAL), pc(ORIGINAL))), // 88 to_original: ldr x16, original
    br(X16), //                                   92 br x16
  ];
  const out = new Uint8Array(GUARD_SIZE);
  out.set(assemble(words), 0);
  const view = new DataView(out.buffer);
  view.setBigUint64(IDENTITY, options.identity, true);
  view.setBigUint64(CALLBACK, options.callback, true);
  view.setBigUint64(ORIGINAL, options.original, true);
  return out;
}
