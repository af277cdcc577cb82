/**
 * Canned replacements for AArch64 (see src/arch/canned.ts), with the design of
 * src/arch/x86_64/canned.ts: `returns`, `sequence` and the fake clock's functions as machine code
 * that never enters JS, under AAPCS64 (Linux, macOS and Windows on arm64 alike).
 *
 * - Every call first adds 1 to the data block's call counter with an exclusive load/store loop
 *   (`ldxr`/`stxr`), which every ARMv8 core has (the LSE `ldadd` is missing on ARMv8.0 cores such
 *   as the Cortex-A72); `sequence` takes the counter's old value as its step, clamped to the last.
 * - The code writes only x9–x17 (temporaries and the intra-procedure-call scratch registers), x0
 *   and v0 (results), x29/x30 and the stack when it calls the real clock, and the flags. x8 (the
 *   indirect result) and x18 (the platform register) stay untouched.
 * - The fake clock reads one aligned 8-byte word JS stores atomically (`state`), through a literal
 *   holding its address. At rate 1 the word is an offset added to the real clock, read through the
 *   original in the data block: CLOCK_MONOTONIC through `clock_gettime`'s original (POSIX), the
 *   precise system time through `GetSystemTimePreciseAsFileTime`'s (Windows). `clock_gettime`
 *   branches to the original for every clock it does not fake.
 *
 * Listings are data with a comment per instruction; branch and pc-relative offsets come from
 * labels, resolved by `assemble`.
 */
import type { CannedPlan, CannedSpec, CannedValue, PosixClockFunction } from "../canned.ts";
import { CANNED_DATA, cannedCodeWith, clockIds } from "../canned.ts";
import { addImmediate, adr, adrp, bCond, blr, br, cbz, ldrBase, ldrLiteral, movAbs, movz, NOP } from "./writer.ts";

/** The address of a label, for the words that refer to one. */
type Resolve = (label: string) => bigint;

/** One instruction word, or one placed at `pc` that refers to labels or addresses. */
type Word = number | ((pc: bigint, at: Resolve) => number | null);

type Line = Word | { readonly label: string } | { readonly quad: bigint } | { readonly align: 8 };

const X9 = 9, X10 = 10, X11 = 11, X12 = 12, X13 = 13, X15 = 15, X16 = 16, X17 = 17, SP = 31, ZR = 31;

/** `add xd, xn, xm, lsl #shift`. */
function addShifted(rd: number, rn: number, rm: number, shift: number): number {
  return (0x8b000000 | (rm << 16) | (shift << 10) | (rn << 5) | rd) >>> 0;
}

/** `madd xd, xn, xm, xa`: xa + xn * xm; `msub`: xa - xn * xm. */
function multiplyAdd(subtract: boolean, rd: number, rn: number, rm: number, ra: number): number {
  return (0x9b000000 | (rm << 16) | (subtract ? 0x8000 : 0) | (ra << 10) | (rn << 5) | rd) >>> 0;
}

/** `udiv xd, xn, xm`. */
function udiv(rd: number, rn: number, rm: number): number {
  return (0x9ac00800 | (rm << 16) | (rn << 5) | rd) >>> 0;
}

/** `ldr xt, [xn, #offset]` (`offset` a multiple of 8). */
function ldrOffset(rt: number, rn: number, offset: number): number {
  return (0xf9400000 | ((offset / 8) << 10) | (rn << 5) | rt) >>> 0;
}

/** `str xt, [xn, #offset]` (`offset` a multiple of 8). */
function strOffset(rt: number, rn: number, offset: number): number {
  return (0xf9000000 | ((offset / 8) << 10) | (rn << 5) | rt) >>> 0;
}

/** The addressing forms of `stp`/`ldp`: signed offset, pre-index (`[xn, #o]!`), post-index (`[xn], #o`). */
type PairForm = "offset" | "pre" | "post";
const PAIR_FORMS: Readonly<Record<PairForm, number>> = { offset: 0xa9000000, pre: 0xa9800000, post: 0xa8800000 };

/** `stp`/`ldp xt1, xt2` in `form` with the byte `offset` (a multiple of 8, ±512). */
function pair(load: boolean, form: PairForm, rt1: number, rt2: number, rn: number, offset: number): number {
  const imm7 = Number(BigInt.asUintN(7, BigInt(offset / 8)));
  return (PAIR_FORMS[form] | (load ? 0x400000 : 0) | (imm7 << 15) | (rt2 << 10) | (rn << 5) | rt1) >>> 0;
}

/** Checks a pc-relative encoder's reach (the data block and literals are near by construction). */
function reach(word: number | null): number {
  if (word === null) throw new RangeError("canned code: a label or the data block is out of pc-relative reach");
  return word;
}

function label(name: string): Line {
  return { label: name };
}

/** The listing's bytes placed at `at`: labels resolved, `align` padded with `nop`. */
function assemble(lines: readonly Line[], at: bigint): Uint8Array {
  const labels = new Map<string, bigint>();
  const place = (emit: (offset: number, line: Line) => void) => {
    let offset = 0;
    for (const line of lines) {
      if (typeof line === "object" && "align" in line) {
        if (offset % line.align !== 0) emit(offset, NOP);
        offset = Math.ceil(offset / line.align) * line.align;
        continue;
      }
      emit(offset, line);
      if (typeof line !== "object") offset += 4;
      else if ("quad" in line) offset += 8;
    }
    return offset;
  };
  const length = place((offset, line) => {
    if (typeof line === "object" && "label" in line) labels.set(line.label, at + BigInt(offset));
  });
  const out = new Uint8Array(length);
  const view = new DataView(out.buffer);
  place((offset, line) => {
    if (typeof line === "number") view.setUint32(offset, line, true);
    else if (typeof line === "function") view.setUint32(offset, reach(line(at + BigInt(offset), (name) => labels.get(name)!)), true);
    else if ("quad" in line) view.setBigUint64(offset, BigInt.asUintN(64, line.quad), true);
  });
  return out;
}

/** The plan of a listing: its length does not depend on where it is placed. */
function plan(lines: (data: bigint) => Line[]): CannedPlan {
  return {
    size: assemble(lines(0n), 0n).length,
    dataSize: CANNED_DATA.size,
    encode: (at, data) => assemble(lines(data), at),
  };
}

/** x16 = the data block; the call counter goes up by one; x17 = its old value. */
function count(data: bigint): Line[] {
  return [
    (pc) => adrp(X16, pc, data), //                                adrp x16, data
    addImmediate(X16, X16, Number(data % 4096n)), //              add x16, x16, :lo12:data
    label("retry"),
    (0xc85f7c00 | (X16 << 5) | X17) >>> 0, //                     retry: ldxr x17, [x16]
    addImmediate(X9, X17, 1), //                                  add x9, x17, #1
    (0xc8007c00 | (X15 << 16) | (X16 << 5) | X9) >>> 0, //       stxr w15, x9, [x16]
    (pc, at) => cbz({ nonzero: true, sf: false, rt: X15 }, pc, at("retry")), // cbnz w15, retry: another core came between
  ];
}

/** The value into its return register. */
function load(value: CannedValue): number[] {
  switch (value.register) {
    case "integer":
      return movAbs(0, value.bits); //                          mov x0, #value
    case "f64":
      return [...movAbs(X9, value.bits), 0x9e670120]; //         mov x9, #bits; fmov d0, x9
    case "f32":
      return [...movAbs(X9, value.bits % 2n ** 32n), 0x1e270120]; // mov w9, #bits; fmov s0, w9
  }
}

const RET = 0xd65f03c0;

/** Every call returns the value. */
function returnsPlan(value: CannedValue): CannedPlan {
  return plan((data) => [
    ...count(data),
    ...load(value),
    RET, // ret
  ]);
}

/** Each call returns the next value; the last repeats. */
function sequencePlan(values: readonly CannedValue[]): CannedPlan {
  const last = values.length - 1;
  if (values.length === 0 || last > 0x7fff_ffff) throw new RangeError("a sequence needs 1 to 2^31 values");
  const kind = values[0]!.register === "integer" ? "x" : values[0]!.register === "f64" ? "d" : "s";
  return plan((data) => [
    ...count(data), //                                                  x17 = the step
    ...movAbs(X9, BigInt(last)), //                                     mov x9, #last
    (0xeb00001f | (X9 << 16) | (X17 << 5)) >>> 0, //                   cmp x17, x9
    (0x9a800000 | (X9 << 16) | (0x3 << 12) | (X17 << 5) | X17) >>> 0, // csel x17, x17, x9, lo: the last repeats
    (pc, at) => adr(X16, pc, at("values")), //                          adr x16, values
    addShifted(X16, X16, X17, 3), //                                    add x16, x16, x17, lsl #3
    ldrBase(kind, 0, X16), //                                           ldr x0 / d0 / s0, [x16]
    RET, //                                                             ret
    { align: 8 },
    label("values"),
    ...values.map((v) => ({ quad: v.bits })), //                        .quad value, ...
  ]);
}

/**
 * x9 = the fake time: the state word, plus the real clock at rate 1, read by calling the original
 * (x16 = the data block) with the words of `call` (x0 and x1 are kept, the frame has 16 bytes of
 * scratch at sp+32), then `result` reading the answer into x9.
 */
function fakeTime(rate: 0 | 1, call: readonly number[], result: readonly number[]): Line[] {
  const state = [
    (pc: bigint, at: Resolve) => ldrLiteral("x", X10, pc, at("state")), // ldr x10, state: its address
  ];
  if (rate === 0) return [...state, ldrBase("x", X9, X10)]; //            ldr x9, [x10]
  return [
    pair(false, "pre", 29, 30, SP, -48), //            stp x29, x30, [sp, #-48]!
    addImmediate(29, SP, 0), //                        mov x29, sp
    pair(false, "offset", 0, 1, SP, 16), //            stp x0, x1, [sp, #16]: the arguments
    ...call,
    ldrOffset(X16, X16, CANNED_DATA.original), //      ldr x16, [x16, #original]
    blr(X16), //                                       blr x16
    ...result,
    pair(true, "offset", 0, 1, SP, 16), //             ldp x0, x1, [sp, #16]
    pair(true, "post", 29, 30, SP, 48), //             ldp x29, x30, [sp], #48
    ...state,
    ldrBase("x", X10, X10), //                         ldr x10, [x10]: the offset
    addShifted(X9, X9, X10, 0), //                     add x9, x9, x10
  ];
}

/** CLOCK_MONOTONIC in nanoseconds into x9, through `clock_gettime`'s original. */
function monotonic(os: string, rate: 0 | 1): Line[] {
  return fakeTime(rate, [
    movz(0, clockIds(os).monotonic, 0), //          mov x0, #CLOCK_MONOTONIC
    addImmediate(1, SP, 32), //                     add x1, sp, #32: a timespec
  ], [
    pair(true, "offset", X9, X10, SP, 32), //       ldp x9, x10, [sp, #32]: tv_sec, tv_nsec
    ...movAbs(X11, 1_000_000_000n), //              mov x11, #1000000000
    multiplyAdd(false, X9, X9, X11, X10), //        madd x9, x9, x11, x10: nanoseconds
  ]);
}

/** The literal holding the state word's address. */
function stateLiteral(state: bigint): Line[] {
  return [{ align: 8 }, label("state"), { quad: state }];
}

/** `time`, `gettimeofday` and `clock_gettime` (Linux, macOS). */
function posixClock(fn: PosixClockFunction, os: string, rate: 0 | 1, state: bigint): CannedPlan {
  switch (fn) {
    case "time": // time_t time(time_t *t)
      return plan((data) => [
        ...count(data),
        ...monotonic(os, rate),
        ...movAbs(X11, 1_000_000_000n), //                            mov x11, #1000000000
        udiv(X10, X9, X11), //                                       udiv x10, x9, x11: seconds
        (pc, at) => cbz({ nonzero: false, sf: true, rt: 0 }, pc, at("done")), // cbz x0, done
        strOffset(X10, 0, 0), //                                     str x10, [x0]: *t
        label("done"),
        0xaa0003e0 | (X10 << 16), //                                 done: mov x0, x10
        RET, //                                                      ret
        ...stateLiteral(state),
      ]);
    case "gettimeofday": // int gettimeofday(struct timeval *tv, struct timezone *tz)
      return plan((data) => [
        ...count(data),
        ...monotonic(os, rate),
        (pc, at) => cbz({ nonzero: false, sf: true, rt: 0 }, pc, at("no_tv")), // cbz x0, no_tv
        movz(X11, 1000, 0), //                                       mov x11, #1000
        udiv(X10, X9, X11), //                                       udiv x10, x9, x11: microseconds
        ...movAbs(X11, 1_000_000n), //                               mov x11, #1000000
        udiv(X12, X10, X11), //                                      udiv x12, x10, x11: seconds
        multiplyAdd(true, X13, X12, X11, X10), //                    msub x13, x12, x11, x10: microseconds within it
        pair(false, "offset", X12, X13, 0, 0), //                    stp x12, x13, [x0]: tv_sec, tv_usec
        label("no_tv"),
        (pc, at) => cbz({ nonzero: false, sf: true, rt: 1 }, pc, at("no_tz")), // no_tv: cbz x1, no_tz
        strOffset(ZR, 1, 0), //                                      str xzr, [x1]: UTC, as glibc fills it
        label("no_tz"),
        0x52800000, //                                               no_tz: mov w0, #0
        RET, //                                                      ret
        ...stateLiteral(state),
      ]);
    case "clock_gettime": // int clock_gettime(clockid_t id, struct timespec *ts)
      return plan((data) => [
        ...count(data),
        ...clockIds(os).realtime.flatMap((id): Line[] =>
          id === 0
            ? [(pc, at) => cbz({ nonzero: false, sf: false, rt: 0 }, pc, at("fake"))] // cbz w0, fake
            : [
              (0x7100001f | (id << 10)) >>> 0, //                    cmp w0, #id
              (pc, at) => bCond(0, false, pc, at("fake")), //        b.eq fake
            ]
        ),
        ldrOffset(X16, X16, CANNED_DATA.original), //                ldr x16, [x16, #original]
        br(X16), //                                                  br x16: any other clock is real
        label("fake"),
        ...monotonic(os, rate),
        (pc, at) => cbz({ nonzero: false, sf: true, rt: 1 }, pc, at("fault")), // fake: cbz x1, fault
        ...movAbs(X11, 1_000_000_000n), //                           mov x11, #1000000000
        udiv(X10, X9, X11), //                                       udiv x10, x9, x11: seconds
        multiplyAdd(true, X12, X10, X11, X9), //                     msub x12, x10, x11, x9: nanoseconds
        pair(false, "offset", X10, X12, 1, 0), //                    stp x10, x12, [x1]: tv_sec, tv_nsec
        0x52800000, //                                               mov w0, #0
        RET, //                                                      ret
        label("fault"),
        0x12800000, //                                               fault: mov w0, #-1: no timespec to fill
        RET, //                                                      ret
        ...stateLiteral(state),
      ]);
  }
}

/** `GetSystemTimeAsFileTime` and `GetSystemTimePreciseAsFileTime` (Windows on arm64). */
function windowsClock(rate: 0 | 1, state: bigint): CannedPlan {
  // void GetSystemTime[Precise]AsFileTime(FILETIME *ft): ft in x0
  return plan((data) => [
    ...count(data),
    ...fakeTime(rate, [
      addImmediate(0, SP, 32), //       add x0, sp, #32: a FILETIME
    ], [
      ldrOffset(X9, SP, 32), //         ldr x9, [sp, #32]
    ]),
    strOffset(X9, 0, 0), //             str x9, [x0]: the FILETIME
    RET, //                             ret
    ...stateLiteral(state),
  ]);
}

/** The canned code of `spec` for `os`. */
export function cannedCode(spec: CannedSpec, os: string): CannedPlan {
  return cannedCodeWith({ returns: returnsPlan, sequence: sequencePlan, posixClock, windowsClock }, spec, os);
}
