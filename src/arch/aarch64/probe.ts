/**
 * The native probe (AArch64): see src/arch/probe.ts. Counting reads the thread's identity exactly
 * as the guard does (src/arch/aarch64/guard.ts) and compares it with the record's owner: the
 * owner thread's call is a plain load, add and store of its own counter; any other thread's an
 * exclusive load/store loop on the shared one (plain ARMv8.0: no LSE atomics needed). Then it
 * runs on into its own copy of the original's first instructions (`ProbeOptions.inline`), or
 * jumps to the original (`b` where it reaches, else through the record). Timing also takes the
 * record's timing slot with an acquiring exclusive pair, keeps the caller's return address (x30)
 * in the record and points x30 at `exit`, reads `cntvct_el0`; at `exit` it reads the counter
 * again, adds the difference, frees the slot with a releasing store and returns to the caller.
 *
 * The owner's count needs only x16 and x17. The exclusive loop and the timing need two registers
 * more, so x0 and x1 are pushed (sp stays 16-byte aligned) and popped before the jump: every
 * argument in x0–x7, v0–v7, x8 and on the stack reaches the original as it came. On the way out
 * x0/x1 (the results) are kept the same way and v0–v3 are not touched. Only x16, x17, x30 and the
 * flags change.
 */
import type { ProbeCode, ProbeOptions } from "../probe.ts";
import { PROBE_RECORD as R } from "../probe.ts";
import { assembleListing, type Line, type Place } from "../listing.ts";
import { threadPointer } from "./guard.ts";
import { addImmediate, adr, adrp, assemble, b, br, cbz } from "./writer.ts";

const X0 = 0, X1 = 1, X16 = 16, X17 = 17, X30 = 30;

/**
 * More bytes than any probe's code, its copy of the original's start included: a direct branch
 * that reaches from its start and from this far on reaches from all of it.
 */
const LONGEST = 4096n;

/** `ldr xt, [xn, #offset]` / `str xt, [xn, #offset]` (unsigned offset, a multiple of 8). */
function ldr(rt: number, rn: number, offset: number): number {
  return (0xf9400000 | ((offset / 8) << 10) | (rn << 5) | rt) >>> 0;
}
function str(rt: number, rn: number, offset: number): number {
  return (0xf9000000 | ((offset / 8) << 10) | (rn << 5) | rt) >>> 0;
}

/** The little-endian words of `code` (whole instructions). */
function words(code: Uint8Array): number[] {
  const view = new DataView(code.buffer, code.byteOffset, code.byteLength);
  return Array.from({ length: code.length / 4 }, (_, i) => view.getUint32(i * 4, true));
}

function reach<T>(value: T | null): T {
  if (value === null) throw new RangeError("probe data or label out of pc-relative reach");
  return value;
}

/** The probe's listing. */
function listing({ at, data, original, inline, timing, os }: ProbeOptions): Line[] {
  if (data % 8n !== 0n) throw new RangeError("probe data must be 8-byte aligned");
  const pc = (p: Place) => at + BigInt(p.start);
  const to = (p: Place, label: string) => at + BigInt(p.label(label));
  const low = Number(data % 4096n);
  const page = (rd: number): Line => (p) => [reach(adrp(rd, pc(p), data))]; // adrp xd, data
  const record: Line[] = [
    page(X16), //                           adrp x16, data
    [addImmediate(X16, X16, low)], //       add x16, x16, :lo12:data
  ];
  const ifNonzero = (rt: number, sf: boolean, label: string): Line => (p) => [
    reach(cbz({ nonzero: true, sf, rt }, pc(p), to(p, label))),
  ];
  const near = b(at, original) !== null && b(at + LONGEST, original) !== null;
  const jump: Line = (p) => [reach(b(pc(p), original))]; // b original
  const pop: Line = [0xa8c107e0]; //                        ldp x0, x1, [sp], #16
  const push: Line = [0xa9bf07e0]; //                       stp x0, x1, [sp, #-16]!
  // The probe's own copy of the original's first instructions, where it has one.
  const copy: Line = (p) => words(inline!(pc(p)));
  // x16 holds the record; x0 and x1 are pushed when `pushed`. Into the copy when `into`.
  const toOriginal = (pushed: boolean, into = false): Line[] => {
    const restore = pushed ? [pop] : [];
    if (into && inline) return [...restore, copy]; //      the copy of the original's start
    if (near) return [...restore, jump]; //                 b original
    return [
      [ldr(X16, X16, R.original)], //                       ldr x16, [x16, #original]
      ...restore,
      [br(X16)], //                                         br x16
    ];
  };
  const own: Line[] = [
    page(X17), //                           adrp x17, data
    threadPointer(os, X16), //              mrs x16, tpidr_el0; and x16, x16, #~7: this thread
    [ldr(X17, X17, low + R.thread)], //     ldr x17, [x17, #:lo12:data + thread]
    [0xca110210], //                        eor x16, x16, x17
    ifNonzero(X16, true, "other"), //       cbnz x16, other: not the owner
    ...record, //                           adrp x16, data; add x16, x16, :lo12:data
    [ldr(X17, X16, R.ownCalls)], //         ldr x17, [x16, #ownCalls]: the owner alone writes it
    [addImmediate(X17, X17, 1)], //         add x17, x17, #1
    [str(X17, X16, R.ownCalls)], //         str x17, [x16, #ownCalls]
  ];
  const shared: Line[] = [
    "other",
    push, //                                stp x0, x1, [sp, #-16]!
    ...record, //                           adrp x16, data; add x16, x16, :lo12:data
    "count",
    [0xc85f7e00], //                        ldxr x0, [x16]: calls
    [addImmediate(X0, X0, 1)], //           add x0, x0, #1
    [0xc8017e00], //                        stxr w1, x0, [x16]
    ifNonzero(X1, false, "count"), //       cbnz w1, count: lost the reservation, again
  ];
  if (!timing) return [...own, ...toOriginal(false, true), ...shared, ...toOriginal(true)];
  return [
    ...own,
    push, //                                stp x0, x1, [sp, #-16]!
    "time",
    [addImmediate(X17, X16, R.timer)], //   add x17, x16, #timer
    [ldr(X0, X17, 0)], //                   ldr x0, [x17]
    ifNonzero(X0, true, "to_original"), //  cbnz x0, to_original: a call is being timed
    "claim",
    [0xc85ffe20], //                        ldaxr x0, [x17]
    ifNonzero(X0, true, "held"), //         cbnz x0, held: another took it first
    [0xd2800020], //                        mov x0, #1
    [0xc8017e20], //                        stxr w1, x0, [x17]: take the slot
    ifNonzero(X1, false, "claim"), //       cbnz w1, claim
    [str(X30, X16, R.saved)], //            str x30, [x16, #saved]: the caller's return address
    [0xd53be040], //                        mrs x0, cntvct_el0
    [str(X0, X16, R.start)], //             str x0, [x16, #start]
    (p) => [reach(adr(X30, pc(p), to(p, "exit")))], // adr x30, exit: the original returns there
    (p) => [reach(b(pc(p), to(p, "to_original")))], // b to_original
    "held",
    [0xd5033f5f], //                        clrex: drop the reservation ldaxr left
    "to_original",
    ...toOriginal(true, true),
    "exit",
    push, //                                stp x0, x1, [sp, #-16]!: the results
    ...record, //                           adrp x16, data; add x16, x16, :lo12:data
    [0xd53be040], //                        mrs x0, cntvct_el0
    [ldr(X1, X16, R.start)], //             ldr x1, [x16, #start]
    [0xcb010000], //                        sub x0, x0, x1
    [ldr(X1, X16, R.ticks)], //             ldr x1, [x16, #ticks] (the slot's holder alone writes it)
    [0x8b000021], //                        add x1, x1, x0
    [str(X1, X16, R.ticks)], //             str x1, [x16, #ticks]
    [ldr(X1, X16, R.timed)], //             ldr x1, [x16, #timed]
    [addImmediate(X1, X1, 1)], //           add x1, x1, #1
    [str(X1, X16, R.timed)], //             str x1, [x16, #timed]
    [ldr(X30, X16, R.saved)], //            ldr x30, [x16, #saved]
    [addImmediate(X17, X16, R.timer)], //   add x17, x16, #timer
    [0xc89ffe3f], //                        stlr xzr, [x17]: free the slot, after the stores above
    pop, //                                 ldp x0, x1, [sp], #16
    [0xd65f03c0], //                        ret: back to the caller
    ...shared,
    (p) => [reach(b(pc(p), to(p, "time")))], // b time
  ];
}

/** The AArch64 native probe. */
export const probe: ProbeCode = {
  // The jump through the record is the longer one.
  size: (timing, os) => assembleListing(listing({ at: 0n, data: 0n, original: 2n ** 62n, timing, os }), 4).bytes.length,
  encode: (options) => assembleListing(listing(options), 4).bytes,
  clockReader: assemble([
    0xd53be040, // mrs x0, cntvct_el0
    0xd65f03c0, // ret
  ]),
};
