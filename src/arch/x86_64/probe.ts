/**
 * The native probe (x86-64): see src/arch/probe.ts. Counting reads the thread's identity exactly
 * as the guard does (src/arch/x86_64/guard.ts) and compares it with the record's owner: the owner
 * thread's call is a plain `inc` of its own counter, any other thread's a `lock inc` of the
 * shared one. Then it runs on into its own copy of the original's first instructions
 * (`ProbeOptions.inline`), or jumps to the original (`jmp rel32` where it reaches, else through
 * the record). Timing also takes the record's timing slot with `xchg` (locked by itself), keeps
 * the caller's return address in the record and puts `exit` in its place, reads `rdtsc`; at
 * `exit` it reads `rdtsc` again, adds the difference, frees the slot and jumps back to the caller.
 *
 * Only r11 and the flags change on the way in: rax and rdx (rdtsc's outputs; rdx is an argument,
 * al the vector count of varargs calls) are pushed and popped again before the jump, so every
 * argument register and the stack arguments reach the original as they came. On the way out rax
 * and rdx (the results) are kept the same way, xmm0/xmm1 are not touched, and r11 (volatile at a
 * return in System V and Windows x64 alike) carries the return address.
 */
import type { ProbeCode, ProbeOptions } from "../probe.ts";
import { PROBE_RECORD as R } from "../probe.ts";
import { assembleListing, type Line, type Place } from "../listing.ts";
import { threadPointerOperand } from "./guard.ts";
import { i32le, rel32 } from "./writer.ts";

/** rip-relative displacement from the end of the line at `p` (placed at `at`) to `target`. */
function rip(at: bigint, p: Place, target: bigint): Uint8Array {
  const d = target - (at + BigInt(p.end));
  if (d < -(2n ** 31n) || d >= 2n ** 31n) throw new RangeError("probe data or original out of rip-relative reach");
  return i32le(Number(d));
}

/**
 * More bytes than any probe's code, its copy of the original's start included: a rel32 jump that
 * reaches from its start and from this far on reaches from all of it.
 */
const LONGEST = 4096n;

/** `jne rel32` to `label`. */
function jne(label: string): Line {
  return (p) => [0x0f, 0x85, ...i32le(p.label(label) - p.end)];
}

/** The probe's listing. */
function listing({ at, data, original: to, inline, timing, os }: ProbeOptions): Line[] {
  const word = (offset: number) => (p: Place) => rip(at, p, data + BigInt(offset));
  const calls = word(R.calls), ownCalls = word(R.ownCalls), thread = word(R.thread), timer = word(R.timer);
  const saved = word(R.saved), start = word(R.start), ticks = word(R.ticks), timed = word(R.timed);
  const original = word(R.original);
  const [segment, sib, ...disp] = threadPointerOperand(os);
  const near = rel32(at, to) !== null && rel32(at + LONGEST, to) !== null;
  const toOriginal: Line = near
    ? (p) => [0xe9, ...rip(at, p, to)] //                       jmp original
    : (p) => [0xff, 0x25, ...original(p)]; //                   jmp [rip+original]
  // The probe's own copy of the original's first instructions, where it has one.
  const intoOriginal: Line = inline ? (p) => [...inline(at + BigInt(p.start))] : toOriginal;
  const count: Line[] = [
    [segment, 0x4c, 0x8b, 0x1c, sib, ...disp], // mov r11, qword fs:[0x10] (gs:[0x30] on Windows): this thread
    (p) => [0x4c, 0x3b, 0x1d, ...thread(p)], //  cmp r11, [rip+thread]
    jne("other"), //                             jne other: not the owner
    (p) => [0x48, 0xff, 0x05, ...ownCalls(p)], // inc qword [rip+ownCalls]: the owner alone writes it
  ];
  const other: Line = (p) => [0xf0, 0x48, 0xff, 0x05, ...calls(p)]; // lock inc qword [rip+calls]
  if (!timing) return [...count, intoOriginal, "other", other, toOriginal];
  const local = (label: string) => (p: Place) => rip(at, p, at + BigInt(p.label(label)));
  const readClock: Line[] = [
    [0x0f, 0x31], //             rdtsc: edx:eax
    [0x48, 0xc1, 0xe2, 0x20], // shl rdx, 32
    [0x48, 0x09, 0xd0], //       or rax, rdx: the 64-bit count
  ];
  return [
    ...count,
    "time",
    (p) => [0x48, 0x83, 0x3d, ...timer(p), 0x00], //   cmp qword [rip+timer], 0
    jne("to_original"), //                              jne to_original: a call is being timed
    [0x41, 0xbb, 0x01, 0x00, 0x00, 0x00], //            mov r11d, 1
    (p) => [0x4c, 0x87, 0x1d, ...timer(p)], //         xchg [rip+timer], r11: take the slot
    [0x4d, 0x85, 0xdb], //                              test r11, r11
    jne("to_original"), //                              jne to_original: another took it first
    [0x50], //                                          push rax
    [0x52], //                                          push rdx
    [0x4c, 0x8b, 0x5c, 0x24, 0x10], //                  mov r11, [rsp+16]: the caller's return address
    (p) => [0x4c, 0x89, 0x1d, ...saved(p)], //         mov [rip+saved], r11
    (p) => [0x4c, 0x8d, 0x1d, ...local("exit")(p)], // lea r11, [rip+exit]
    [0x4c, 0x89, 0x5c, 0x24, 0x10], //                  mov [rsp+16], r11: the original returns to exit
    ...readClock,
    (p) => [0x48, 0x89, 0x05, ...start(p)], //         mov [rip+start], rax
    [0x5a], //                                          pop rdx
    [0x58], //                                          pop rax
    "to_original",
    intoOriginal, //                                    jmp original (direct or through the record), or the copy of its start
    "other",
    other, //                                           lock inc qword [rip+calls]
    // rel32, not a short jump: the copy of the original's start in between may be tens of bytes.
    (p) => [0xe9, ...i32le(p.label("time") - p.end)], // jmp time
    "exit",
    [0x50], //                                          push rax: the results
    [0x52], //                                          push rdx
    ...readClock,
    (p) => [0x48, 0x2b, 0x05, ...start(p)], //         sub rax, [rip+start]
    (p) => [0x48, 0x01, 0x05, ...ticks(p)], //         add [rip+ticks], rax (the slot's holder alone writes it)
    (p) => [0x48, 0xff, 0x05, ...timed(p)], //         inc qword [rip+timed]
    (p) => [0x4c, 0x8b, 0x1d, ...saved(p)], //         mov r11, [rip+saved]
    (p) => [0x48, 0xc7, 0x05, ...timer(p), 0, 0, 0, 0], // mov qword [rip+timer], 0: free the slot (a store releases)
    [0x5a], //                                          pop rdx
    [0x58], //                                          pop rax
    [0x41, 0xff, 0xe3], //                              jmp r11: back to the caller
  ];
}

/** The x86-64 native probe. */
export const probe: ProbeCode = {
  // The jump through the record is the longer one.
  size: (timing, os) => assembleListing(listing({ at: 0n, data: 0n, original: 2n ** 62n, timing, os })).bytes.length,
  encode: (options) => assembleListing(listing(options)).bytes,
  clockReader: Uint8Array.of(
    0x0f, 0x31, //             rdtsc
    0x48, 0xc1, 0xe2, 0x20, // shl rdx, 32
    0x48, 0x09, 0xd0, //       or rax, rdx
    0xc3, //                   ret
  ),
};
