/**
 * The native probe (AArch64): see src/arch/probe.ts. Counting is an exclusive load/store loop on
 * the record's counter (plain ARMv8.0: no LSE atomics needed), then a jump to the original.
 * Timing also takes the record's timing slot with an acquiring exclusive pair, keeps the caller's
 * return address (x30) in the record and points x30 at `exit`, reads `cntvct_el0`; at `exit` it
 * reads the counter again, adds the difference, frees the slot with a releasing store and returns
 * to the caller.
 *
 * The exclusive loops need two registers besides x16/x17, so x0 and x1 are pushed (sp stays
 * 16-byte aligned) and popped before the jump: every argument in x0–x7, v0–v7, x8 and on the stack
 * reaches the original as it came. On the way out x0/x1 (the results) are kept the same way and
 * v0–v3 are not touched. Only x16, x17, x30 and the flags change. No thread pointer is read, so
 * one listing serves Linux, Windows and macOS.
 */
import type { ProbeCode } from "../probe.ts";
import { PROBE_RECORD as R } from "../probe.ts";
import { assembleListing, type Line, type Place } from "../listing.ts";
import { adr, adrp, assemble, b, br, cbz } from "./writer.ts";

const X0 = 0, X1 = 1, X16 = 16, X17 = 17, X30 = 30;

/** `ldr xt, [xn, #offset]` / `str xt, [xn, #offset]` (unsigned offset, a multiple of 8). */
function ldr(rt: number, rn: number, offset: number): number {
  return (0xf9400000 | ((offset / 8) << 10) | (rn << 5) | rt) >>> 0;
}
function str(rt: number, rn: number, offset: number): number {
  return (0xf9000000 | ((offset / 8) << 10) | (rn << 5) | rt) >>> 0;
}

/** `add xd, xn, #imm12`. */
function addImmediate(rd: number, rn: number, imm12: number): number {
  return (0x91000000 | (imm12 << 10) | (rn << 5) | rd) >>> 0;
}

function reach<T>(value: T | null): T {
  if (value === null) throw new RangeError("probe data or label out of pc-relative reach");
  return value;
}

/** The probe's listing at `at`, data at `data`. */
function listing(at: bigint, data: bigint, timing: boolean): Line[] {
  if (data % 8n !== 0n) throw new RangeError("probe data must be 8-byte aligned");
  const pc = (p: Place) => at + BigInt(p.start);
  const to = (p: Place, label: string) => at + BigInt(p.label(label));
  const record: Line = (p) => [
    reach(adrp(X16, pc(p), data)), //          adrp x16, data
    addImmediate(X16, X16, Number(data % 4096n)), // add x16, x16, :lo12:data
  ];
  const ifNonzero = (rt: number, sf: boolean, label: string): Line => (p) => [
    reach(cbz({ nonzero: true, sf, rt }, pc(p), to(p, label))),
  ];
  const count: Line[] = [
    [0xa9bf07e0], //                stp x0, x1, [sp, #-16]!
    record, //                      adrp x16, data; add x16, x16, :lo12:data
    "count",
    [0xc85f7e00], //                ldxr x0, [x16]: calls
    [addImmediate(X0, X0, 1)], //   add x0, x0, #1
    [0xc8017e00], //                stxr w1, x0, [x16]
    ifNonzero(X1, false, "count"), // cbnz w1, count: lost the reservation, again
  ];
  const toOriginal: Line[] = [
    [ldr(X16, X16, R.original)], // ldr x16, [x16, #original]
    [0xa8c107e0], //                ldp x0, x1, [sp], #16
    [br(X16)], //                   br x16
  ];
  if (!timing) return [...count, ...toOriginal];
  return [
    ...count,
    [addImmediate(X17, X16, R.owner)], // add x17, x16, #owner
    [ldr(X0, X17, 0)], //                 ldr x0, [x17]
    ifNonzero(X0, true, "to_original"), // cbnz x0, to_original: a call is being timed
    "claim",
    [0xc85ffe20], //                      ldaxr x0, [x17]
    ifNonzero(X0, true, "held"), //       cbnz x0, held: another took it first
    [0xd2800020], //                      mov x0, #1
    [0xc8017e20], //                      stxr w1, x0, [x17]: take the slot
    ifNonzero(X1, false, "claim"), //     cbnz w1, claim
    [str(X30, X16, R.saved)], //          str x30, [x16, #saved]: the caller's return address
    [0xd53be040], //                      mrs x0, cntvct_el0
    [str(X0, X16, R.start)], //           str x0, [x16, #start]
    (p) => [reach(adr(X30, pc(p), to(p, "exit")))], // adr x30, exit: the original returns there
    (p) => [reach(b(pc(p), to(p, "to_original")))], // b to_original
    "held",
    [0xd5033f5f], //                      clrex: drop the reservation ldaxr left
    "to_original",
    ...toOriginal,
    "exit",
    [0xa9bf07e0], //                      stp x0, x1, [sp, #-16]!: the results
    record, //                            adrp x16, data; add x16, x16, :lo12:data
    [0xd53be040], //                      mrs x0, cntvct_el0
    [ldr(X1, X16, R.start)], //           ldr x1, [x16, #start]
    [0xcb010000], //                      sub x0, x0, x1
    [ldr(X1, X16, R.ticks)], //           ldr x1, [x16, #ticks] (the slot's holder alone writes it)
    [0x8b000021], //                      add x1, x1, x0
    [str(X1, X16, R.ticks)], //           str x1, [x16, #ticks]
    [ldr(X1, X16, R.timed)], //           ldr x1, [x16, #timed]
    [addImmediate(X1, X1, 1)], //         add x1, x1, #1
    [str(X1, X16, R.timed)], //           str x1, [x16, #timed]
    [ldr(X30, X16, R.saved)], //          ldr x30, [x16, #saved]
    [addImmediate(X17, X16, R.owner)], // add x17, x16, #owner
    [0xc89ffe3f], //                      stlr xzr, [x17]: free the slot, after the stores above
    [0xa8c107e0], //                      ldp x0, x1, [sp], #16
    [0xd65f03c0], //                      ret: back to the caller
  ];
}

/** The AArch64 native probe. */
export const probe: ProbeCode = {
  size: (timing) => assembleListing(listing(0n, 0n, timing), 4).bytes.length,
  encode: (at, data, timing) => assembleListing(listing(at, data, timing), 4).bytes,
  clockReader: assemble([
    0xd53be040, // mrs x0, cntvct_el0
    0xd65f03c0, // ret
  ]),
};
