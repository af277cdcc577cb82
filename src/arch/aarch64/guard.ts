/**
 * The guard stub that stands in front of a JS replacement (AArch64), with the contract of
 * src/arch/x86_64/guard.ts: calls from other threads (or from any, once the isolate's identity word
 * is 0), calls from the JS thread while the replacement is already running, and every call once
 * the patch is retired go to the original, and so do the runtime's own calls (a
 * return address in the runtime's executable outside its FFI's part, `RuntimeCode`). It calls the
 * replacement with `blr` (so its
 * return stays predicted) after keeping the caller's return address (x30) in a per-patch slot, and
 * clears its busy flag when the replacement returns. A call pushes nothing on AArch64, so stack
 * arguments stay where the callee expects them, whatever the signature.
 *
 * It writes only x16 and x17 (the intra-procedure-call scratch registers, which any veneer or PLT
 * entry may clobber) and x30 (the link register, which the caller gave up by calling). Arguments
 * in x0–x7, v0–v7 and x8 (the indirect result), and the results in x0–x1 and v0–v3, pass untouched;
 * the condition flags too (`eor` + `cbnz`, not `cmp`).
 */
import type { GuardOptions, RuntimeCode } from "../types.ts";
import { RedefineError } from "../../errors.ts";
import { align, assembleListing, type Line } from "../listing.ts";
import { addImmediate, adrp, assemble, blr, br, cbz, ldrLiteral, NOP, tbz } from "./writer.ts";

/** Bytes of code (with its seven literals). */
export const GUARD_SIZE = 200;
/** Bytes of read+write data: the saved return address, then the busy flag. */
export const GUARD_DATA_SIZE = 16;

/**
 * The thread's identity into `rd`, two words: glibc's thread pointer is `tpidr_el0`; Windows keeps
 * the TEB in x18, the platform register; macOS keeps its thread-specific data base in
 * `tpidrro_el0`, whose low three bits held the CPU number in some versions (not run on a Mac). The
 * low bits are cleared everywhere: the others are aligned anyway.
 */
export function threadPointer(os: string, rd: number): number[] {
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

/** A function returning its own return address, read where the guard reads it: x30 at entry. */
export function returnAddressReader(): Uint8Array {
  return assemble([
    0xaa1e03e0, // mov x0, x30
    0xd65f03c0, // ret
  ]);
}

/** The guard's bytes for `options`. */
export function guardStub(options: GuardOptions): Uint8Array {
  const { at, data } = options;
  const X16 = 16, X17 = 17;
  const pc = (offset: number) => at + BigInt(offset);
  const reach = <T>(value: T | null): T => {
    if (value === null) throw new RangeError("guard data or literal out of pc-relative reach");
    return value;
  };
  if (data % 8n !== 0n) throw new RangeError("guard data must be 8-byte aligned");
  // x17 = data: adrp gives its 4 KiB page (±4 GiB), add the offset within the page.
  const dataAddress: Line = (p) => [
    reach(adrp(X17, pc(p.start), data)),
    addImmediate(X17, X17, Number(data % 4096n)),
  ];
  const load = (rt: number, label: string): Line => (p) => [reach(ldrLiteral("x", rt, pc(p.start), pc(p.label(label))))];
  const toOriginal = (sf: boolean): Line => (p) => [
    reach(cbz({ nonzero: true, sf, rt: X16 }, pc(p.start), pc(p.label("to_original")))),
  ];
  // Bit 63 of a difference of two user-space addresses (below 2^63) is its sign: no flags needed.
  const sign = (nonzero: boolean, label: string): Line => (p) => [
    reach(tbz({ nonzero, bit: 63, rt: X16 }, pc(p.start), pc(p.label(label)))),
  ];
  const { bytes } = assembleListing([
    load(X16, "text_start"), //        ldr x16, text_start
    [0xcb1003d0], //                   sub x16, x30, x16: the return address against it
    sign(true, "elsewhere"), //        tbnz x16, #63, elsewhere: below the runtime's code
    load(X16, "text_end"), //          ldr x16, text_end
    [0xcb1003d0], //                   sub x16, x30, x16
    sign(false, "elsewhere"), //       tbz x16, #63, elsewhere: at or above its end
    load(X16, "ffi_start"), //         ldr x16, ffi_start
    [0xcb1003d0], //                   sub x16, x30, x16
    sign(true, "to_original"), //      tbnz x16, #63, to_original: the runtime's own call
    load(X16, "ffi_end"), //           ldr x16, ffi_end
    [0xcb1003d0], //                   sub x16, x30, x16
    sign(false, "to_original"), //     tbz x16, #63, to_original: so is this; inside, its FFI's
    "elsewhere",
    threadPointer(options.os, X16), // mrs x16, tpidr_el0; and x16, x16, #~7
    load(X17, "identity"), //          ldr x17, identity: the word's address
    [0xf9400231], //                   ldr x17, [x17]: the JS thread, 0 once the isolate ended
    [0xca110210], //                   eor x16, x16, x17
    toOriginal(true), //               cbnz x16, to_original: another thread
    dataAddress, //                    adrp x17, data; add x17, x17, :lo12:data
    [0x39402230], //                   ldrb w16, [x17, #8]
    toOriginal(false), //              cbnz w16, to_original: re-entered, or retired
    [0x52800030], //                   mov w16, #1
    [0x39002230], //                   strb w16, [x17, #8]: busy
    [0xf900023e], //                   str x30, [x17]: the caller's return address
    load(X16, "callback"), //          ldr x16, callback
    [blr(X16)], //                     blr x16
    dataAddress, //                    adrp x17, data; add x17, x17, :lo12:data
    [0x39402230], //                   ldrb w16, [x17, #8]
    [0x121f0210], //                   and w16, w16, #2: not running (retired stays)
    [0x39002230], //                   strb w16, [x17, #8]
    [0xf940023e], //                   ldr x30, [x17]
    [0xd65f03c0], //                   ret: back to the caller
    "to_original",
    load(X16, "original"), //          ldr x16, original
    [br(X16)], //                      br x16
    align(8, NOP), //                  (the literals are 8-byte aligned)
    "identity",
    quad(options.identity),
    "callback",
    quad(options.callback),
    "original",
    quad(options.original),
    ...runtimeCodeLiterals(options.runtimeCode),
  ], 4);
  if (bytes.length !== GUARD_SIZE) throw new RangeError(`the guard takes ${bytes.length} bytes, not ${GUARD_SIZE}`);
  return bytes;
}

/** A 64-bit literal as the two words of a listing, low word first. */
function quad(value: bigint): number[] {
  const bits = BigInt.asUintN(64, value);
  return [Number(bits % 2n ** 32n), Number(bits / 2n ** 32n)];
}

/** The literals the guard compares the return address with. */
function runtimeCodeLiterals(code: RuntimeCode): Line[] {
  return [code.start, code.end, code.ffiStart, code.ffiEnd].flatMap((value, i) => [
    ["text_start", "text_end", "ffi_start", "ffi_end"][i]!,
    quad(value),
  ]);
}
