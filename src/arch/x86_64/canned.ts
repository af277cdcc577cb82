/**
 * Canned replacements for x86-64 (see src/arch/canned.ts): `returns`, `sequence` and the fake
 * clock's functions as machine code that never enters JS.
 *
 * - Every call first adds 1 to the data block's call counter with `lock add` (`lock xadd` in
 *   `sequence`, whose step is the counter's old value, clamped to the last value): concurrent
 *   callers each count once and each take a distinct step.
 * - `returns` and `sequence` ignore their arguments, so the code is the same under System V and
 *   Windows x64 (results in rax or xmm0 on both); they write only rax, rcx, rdx, xmm0 and the
 *   flags, which both conventions let a callee clobber.
 * - The fake clock reads its time from one aligned 8-byte word JS stores atomically (`state`). At
 *   rate 0 that word is the time. At rate 1 it is an offset added to the real clock, read through
 *   the original function whose address is in the data block: CLOCK_MONOTONIC through
 *   `clock_gettime`'s original (POSIX; the stack stays 16-byte aligned at the call), the precise
 *   system time through `GetSystemTimePreciseAsFileTime`'s (Windows, with its 32-byte shadow
 *   space). `clock_gettime` jumps to the original for every clock it does not fake: monotonic
 *   clocks drive the runtime's timers. The Windows code has no unwind data: nothing can throw
 *   through it, as the only call it makes cannot fail.
 * - Division by 1e9, 1e3 and 1e6 is unsigned: the fake time is never before 1970 (JS refuses it).
 *
 * Listings are data with a comment per instruction; jump and rip-relative displacements come from
 * labels, resolved by `assemble`.
 */
import type { CannedPlan, CannedSpec, CannedValue, PosixClockFunction } from "../canned.ts";
import { CANNED_DATA, cannedCodeWith, clockIds } from "../canned.ts";
import { i32le, INT3, u64le } from "./writer.ts";

/** A label in the listing, or an absolute address (data, literals). */
type Target = string | bigint;

/** One instruction: `bytes`, then a displacement to `to` (relative to the instruction's end), then `tail`. */
interface Op {
  readonly bytes: readonly number[];
  readonly to?: Target;
  readonly width?: 1 | 4;
  readonly tail?: readonly number[];
}

type Line = Op | { readonly label: string } | { readonly align: number };

/** An instruction with no displacement. */
function raw(...bytes: number[]): Op {
  return { bytes };
}

/** An instruction ending in a rip-relative disp32 to `to`, then `tail` (an immediate). */
function rip(bytes: number[], to: Target, tail: number[] = []): Op {
  return { bytes, to, width: 4, tail };
}

/** A short jump (`jcc rel8`, `jmp rel8`) to `to`. */
function short(opcode: number, to: string): Op {
  return { bytes: [opcode], to, width: 1 };
}

function label(name: string): Line {
  return { label: name };
}

function size(line: Line): number {
  if ("label" in line || "align" in line) return 0;
  return line.bytes.length + (line.width ?? 0) + (line.tail?.length ?? 0);
}

/** The listing's bytes placed at `at`: labels resolved, displacements checked for reach. */
function assemble(lines: readonly Line[], at: bigint): Uint8Array {
  const labels = new Map<string, number>();
  let offset = 0;
  for (const line of lines) {
    if ("label" in line) labels.set(line.label, offset);
    else if ("align" in line) offset = Math.ceil(offset / line.align) * line.align;
    else offset += size(line);
  }
  const out = new Uint8Array(offset).fill(INT3);
  offset = 0;
  for (const line of lines) {
    if ("label" in line) continue;
    if ("align" in line) {
      offset = Math.ceil(offset / line.align) * line.align;
      continue;
    }
    out.set(line.bytes, offset);
    const end = offset + size(line);
    if (line.to !== undefined) {
      const target = typeof line.to === "bigint" ? line.to : at + BigInt(labels.get(line.to)!);
      const disp = target - (at + BigInt(end));
      const limit = line.width === 1 ? 128n : 2n ** 31n;
      if (disp < -limit || disp >= limit) {
        throw new RangeError(`canned code at ${at}: ${String(line.to)} out of reach of a ${line.width}-byte displacement`);
      }
      out.set(line.width === 1 ? [Number(BigInt.asUintN(8, disp))] : i32le(Number(disp)), offset + line.bytes.length);
    }
    out.set(line.tail ?? [], end - (line.tail?.length ?? 0));
    offset = end;
  }
  return out;
}

/** The plan of a listing: its length does not depend on where it is placed (displacements are fixed-width). */
function plan(lines: (at: bigint, data: bigint) => Line[]): CannedPlan {
  return {
    size: assemble(lines(0n, 0n), 0n).length,
    dataSize: CANNED_DATA.size,
    encode: (at, data) => assemble(lines(at, data), at),
  };
}

/** `lock add qword [rip+calls], 1`. */
function count(data: bigint): Op {
  return rip([0xf0, 0x48, 0x83, 0x05], data + BigInt(CANNED_DATA.calls), [0x01]); // lock add qword [rip+calls], 1
}

/** The value into its return register. */
function load(value: CannedValue): Op[] {
  const mov = raw(0x48, 0xb8, ...u64le(value.bits)); // mov rax, imm64
  switch (value.register) {
    case "integer":
      return [mov];
    case "f64":
      return [mov, raw(0x66, 0x48, 0x0f, 0x6e, 0xc0)]; // movq xmm0, rax
    case "f32":
      return [mov, raw(0x66, 0x0f, 0x6e, 0xc0)]; // movd xmm0, eax
  }
}

/** The `index`th quad of the table at rcx into the value's return register. */
function loadIndexed(register: CannedValue["register"]): Op {
  switch (register) {
    case "integer":
      return raw(0x48, 0x8b, 0x04, 0xc1); // mov rax, [rcx+rax*8]
    case "f64":
      return raw(0xf2, 0x0f, 0x10, 0x04, 0xc1); // movsd xmm0, [rcx+rax*8]
    case "f32":
      return raw(0xf3, 0x0f, 0x10, 0x04, 0xc1); // movss xmm0, [rcx+rax*8]
  }
}

/** Every call returns the value. */
function returnsPlan(value: CannedValue): CannedPlan {
  return plan((_at, data) => [
    count(data),
    ...load(value),
    raw(0xc3), // ret
  ]);
}

/** Each call returns the next value; the last repeats. */
function sequencePlan(values: readonly CannedValue[]): CannedPlan {
  const last = values.length - 1;
  if (values.length === 0 || last > 0x7fff_ffff) throw new RangeError("a sequence needs 1 to 2^31 values");
  const register = values[0]!.register;
  return plan((_at, data) => [
    raw(0xb8, ...i32le(1)), //                                                     mov eax, 1
    rip([0xf0, 0x48, 0x0f, 0xc1, 0x05], data + BigInt(CANNED_DATA.calls)), //       lock xadd [rip+calls], rax: the step
    raw(0x48, 0x3d, ...i32le(last)), //                                            cmp rax, last
    short(0x72, "pick"), //                                                        jb pick
    raw(0xb8, ...i32le(last)), //                                                  mov eax, last: the last repeats
    label("pick"),
    rip([0x48, 0x8d, 0x0d], "values"), //                                          lea rcx, [rip+values]
    loadIndexed(register), //                                                      the value of the step
    raw(0xc3), //                                                                  ret
    { align: 8 },
    label("values"),
    ...values.map((v) => raw(...u64le(v.bits))), //                                dq value, ...
  ]);
}

/** rax = the fake time: the state word, plus the real clock's reading at rate 1 (System V). */
function fakeTimeSysV(rate: 0 | 1, state: bigint, data: bigint, monotonic: number): Op[] {
  if (rate === 0) {
    return [
      raw(0x48, 0xb8, ...u64le(state)), // mov rax, state
      raw(0x48, 0x8b, 0x00), //            mov rax, [rax]
    ];
  }
  return [
    raw(0x57), //                                               push rdi (the arguments, kept across the call)
    raw(0x56), //                                               push rsi
    raw(0x48, 0x83, 0xec, 0x18), //                             sub rsp, 24: a timespec, rsp 16-byte aligned
    raw(0xbf, ...i32le(monotonic)), //                          mov edi, CLOCK_MONOTONIC
    raw(0x48, 0x89, 0xe6), //                                   mov rsi, rsp
    rip([0xff, 0x15], data + BigInt(CANNED_DATA.original)), //  call [rip+original]: clock_gettime
    raw(0x48, 0x8b, 0x04, 0x24), //                             mov rax, [rsp]: tv_sec
    raw(0x48, 0x69, 0xc0, ...i32le(1_000_000_000)), //          imul rax, rax, 1000000000
    raw(0x48, 0x03, 0x44, 0x24, 0x08), //                       add rax, [rsp+8]: tv_nsec
    raw(0x48, 0x83, 0xc4, 0x18), //                             add rsp, 24
    raw(0x5e), //                                               pop rsi
    raw(0x5f), //                                               pop rdi
    raw(0x48, 0xb9, ...u64le(state)), //                        mov rcx, state
    raw(0x48, 0x03, 0x01), //                                   add rax, [rcx]: the offset
  ];
}

/** rax, rdx = rax / divisor, rax % divisor (unsigned). */
function divide(divisor: number): Op[] {
  return [
    raw(0xb9, ...i32le(divisor)), // mov ecx, divisor
    raw(0x31, 0xd2), //              xor edx, edx
    raw(0x48, 0xf7, 0xf1), //        div rcx
  ];
}

/** `time`, `gettimeofday` and `clock_gettime` under System V (Linux, macOS). */
function posixClock(fn: PosixClockFunction, os: string, rate: 0 | 1, state: bigint): CannedPlan {
  const ids = clockIds(os);
  const now = (data: bigint) => fakeTimeSysV(rate, state, data, ids.monotonic);
  switch (fn) {
    case "time": // time_t time(time_t *t)
      return plan((_at, data) => [
        count(data),
        ...now(data),
        ...divide(1_000_000_000), // rax = seconds
        raw(0x48, 0x85, 0xff), //    test rdi, rdi
        short(0x74, "done"), //      jz done
        raw(0x48, 0x89, 0x07), //    mov [rdi], rax: *t
        label("done"),
        raw(0xc3), //                ret
      ]);
    case "gettimeofday": // int gettimeofday(struct timeval *tv, struct timezone *tz)
      return plan((_at, data) => [
        count(data),
        ...now(data),
        raw(0x48, 0x85, 0xff), //                  test rdi, rdi
        short(0x74, "no_tv"), //                   jz no_tv
        ...divide(1_000), //                       rax = microseconds
        ...divide(1_000_000), //                   rax = seconds, rdx = microseconds within it
        raw(0x48, 0x89, 0x07), //                  mov [rdi], rax: tv_sec
        raw(0x48, 0x89, 0x57, 0x08), //            mov [rdi+8], rdx: tv_usec
        label("no_tv"),
        raw(0x48, 0x85, 0xf6), //                  test rsi, rsi
        short(0x74, "no_tz"), //                   jz no_tz
        raw(0x48, 0xc7, 0x06, ...i32le(0)), //     mov qword [rsi], 0: UTC, as glibc fills it
        label("no_tz"),
        raw(0x31, 0xc0), //                        xor eax, eax
        raw(0xc3), //                              ret
      ]);
    case "clock_gettime": // int clock_gettime(clockid_t id, struct timespec *ts)
      return plan((_at, data) => [
        count(data),
        ...ids.realtime.flatMap((id) => [
          id === 0 ? raw(0x85, 0xff) : raw(0x83, 0xff, id), // test edi, edi / cmp edi, id: a faked clock?
          short(0x74, "fake"), //                              je fake
        ]),
        rip([0xff, 0x25], data + BigInt(CANNED_DATA.original)), // jmp [rip+original]: any other clock is real
        label("fake"),
        ...now(data),
        raw(0x48, 0x85, 0xf6), //     test rsi, rsi
        short(0x74, "fault"), //      jz fault
        ...divide(1_000_000_000), //  rax = seconds, rdx = nanoseconds
        raw(0x48, 0x89, 0x06), //     mov [rsi], rax: tv_sec
        raw(0x48, 0x89, 0x56, 0x08), // mov [rsi+8], rdx: tv_nsec
        raw(0x31, 0xc0), //           xor eax, eax
        raw(0xc3), //                 ret
        label("fault"),
        raw(0xb8, ...i32le(-1)), //   mov eax, -1: no timespec to fill
        raw(0xc3), //                 ret
      ]);
  }
}

/** `GetSystemTimeAsFileTime` and `GetSystemTimePreciseAsFileTime` under Windows x64. */
function windowsClock(rate: 0 | 1, state: bigint): CannedPlan {
  // void GetSystemTime[Precise]AsFileTime(FILETIME *ft): ft in rcx
  return plan((_at, data) => [
    count(data),
    ...(rate === 0
      ? [
        raw(0x48, 0xb8, ...u64le(state)), //                       mov rax, state
        raw(0x48, 0x8b, 0x00), //                                  mov rax, [rax]
      ]
      : [
        raw(0x51), //                                              push rcx (kept across the call)
        raw(0x48, 0x83, 0xec, 0x30), //                            sub rsp, 48: shadow space, a FILETIME, alignment
        raw(0x48, 0x8d, 0x4c, 0x24, 0x20), //                      lea rcx, [rsp+32]
        rip([0xff, 0x15], data + BigInt(CANNED_DATA.original)), // call [rip+original]: the precise system time
        raw(0x48, 0x8b, 0x44, 0x24, 0x20), //                      mov rax, [rsp+32]
        raw(0x48, 0x83, 0xc4, 0x30), //                            add rsp, 48
        raw(0x59), //                                              pop rcx
        raw(0x48, 0xba, ...u64le(state)), //                       mov rdx, state
        raw(0x48, 0x03, 0x02), //                                  add rax, [rdx]: the offset
      ]),
    raw(0x48, 0x89, 0x01), // mov [rcx], rax: the FILETIME
    raw(0xc3), //             ret
  ]);
}

/** The canned code of `spec` for `os`. */
export function cannedCode(spec: CannedSpec, os: string): CannedPlan {
  return cannedCodeWith({ returns: returnsPlan, sequence: sequencePlan, posixClock, windowsClock }, spec, os);
}
