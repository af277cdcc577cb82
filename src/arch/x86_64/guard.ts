/**
 * The guard stub that stands in front of a JS replacement (x86-64).
 *
 * A JS replacement can only run on the JS thread, and must not be re-entered while the runtime is
 * dispatching it (Deno calls `strlen` there, for one). The guard sends every other call to the
 * original: calls from other threads (told apart by the thread pointer, compared with the
 * isolate's identity word, which is 0 once the isolate ended), calls from the JS thread while the
 * replacement is already running, and every call once the patch is retired (busy bit 1). It must clear its busy flag when the
 * replacement returns, which it can do two ways:
 *
 * - When the signature passes nothing on the stack, it simply calls the replacement (returns stay
 *   predicted). That code is the same for every patch: each patch has only a 12-byte thunk that
 *   loads its record (identity word, callback, original, busy flag) into r11 and jumps to it.
 * - Otherwise it must not push anything (stack arguments must stay where the callee expects them),
 *   so a per-patch guard keeps the caller's return address in a data slot and puts its own return
 *   point in its place.
 *
 * Both touch only r11 (scratch, never an argument) and the flags; every argument register, `al`
 * (the vector count of varargs calls) and the stack arguments reach the replacement or the
 * original untouched, and the replacement's results (rax, rdx, xmm0, xmm1) reach the caller.
 */
import type { GuardLayout, GuardOptions } from "../types.ts";
import { RedefineError } from "../../errors.ts";
import { align, assembleListing, type Line, type Place } from "../listing.ts";
import { i32le, INT3, jmpRel32, u64le } from "./writer.ts";

/** The swapping guard: bytes of code (with its three literals). */
const SWAP_SIZE = 120;
/** The swapping guard's data: the saved return address, then the busy flag. */
const SWAP_DATA_SIZE = 16;
/** A calling guard's thunk: `lea r11, [rip+record]; jmp shared`. */
const THUNK_SIZE = 12;
/** A calling guard's record: JS thread, callback, original, busy flag. */
const RECORD = { identity: 0, callback: 8, original: 16, busy: 24, size: 32 };

/**
 * The thread pointer's home: glibc keeps the thread's own address at `fs:[0x10]` (what
 * `pthread_self()` returns); Windows keeps the TEB's self pointer at `gs:[0x30]`; macOS keeps
 * `pthread_self` in slot 0 of the thread-specific data at `gs:[0]` (not run on a Mac).
 */
function threadPointerOperand(os: string): number[] {
  switch (os) {
    case "linux":
      return [0x64, 0x25, 0x10, 0, 0, 0]; // fs: prefix, SIB absolute disp32 0x10
    case "windows":
      return [0x65, 0x25, 0x30, 0, 0, 0]; // gs: prefix, SIB absolute disp32 0x30
    case "darwin":
      return [0x65, 0x25, 0, 0, 0, 0]; // gs:[0]: slot 0 of the thread's TSD is pthread_self
    default:
      throw new RedefineError(
        "UNSUPPORTED_PLATFORM",
        `the x86-64 guard stub does not know where '${os}' keeps the thread pointer.`,
      );
  }
}

/** A function returning the current thread's pointer, read exactly as the guard reads it. */
export function threadPointerReader(os: string): Uint8Array {
  const [segment, sib, ...disp] = threadPointerOperand(os);
  return Uint8Array.of(
    segment, 0x48, 0x8b, 0x04, sib, ...disp, // mov rax, qword seg:[disp32]
    0xc3, //                                    ret
  );
}

const INTEGER_CLASS = new Set(["i8", "u8", "i16", "u16", "i32", "u32", "i64", "u64", "usize", "isize", "bool", "pointer", "buffer", "function"]);

/**
 * Bytes of stack the guard reserves before calling the replacement, or null when the signature
 * passes arguments on the stack (a call would move them). System V passes 6 integer and 8 vector
 * arguments in registers and wants rsp 16-byte aligned at a call; Windows passes 4 and also wants
 * 32 bytes of shadow space the callee may write.
 */
function callPadding(os: string, parameters: readonly string[]): number | null {
  if (os === "windows") return parameters.length <= 4 ? 40 : null;
  const integers = parameters.filter((t) => INTEGER_CLASS.has(t)).length;
  return integers <= 6 && parameters.length - integers <= 8 ? 8 : null;
}

/** What a patch's guard takes: see `Arch.guard.layout`. */
export function guardLayout(os: string, signature: { parameters: readonly string[] }): GuardLayout {
  const padding = callPadding(os, signature.parameters);
  return padding === null
    ? { size: SWAP_SIZE, dataSize: SWAP_DATA_SIZE, busyOffset: 8, shared: null }
    : { size: THUNK_SIZE, dataSize: RECORD.size, busyOffset: RECORD.busy, shared: sharedCallingGuard(os, padding) };
}

/** The guard's code and first data for `options`. */
export function guardStub(options: GuardOptions): { code: Uint8Array; data: Uint8Array } {
  const layout = guardLayout(options.os, options.signature);
  if (!layout.shared) return { code: swappingGuard(options), data: new Uint8Array(SWAP_DATA_SIZE) };
  if (options.shared === undefined) throw new RangeError("the calling guard needs its shared code placed");
  const record = new Uint8Array(RECORD.size);
  record.set(u64le(options.identity), RECORD.identity);
  record.set(u64le(options.callback), RECORD.callback);
  record.set(u64le(options.original), RECORD.original);
  const jump = jmpRel32(options.at + 7n, options.shared);
  if (!jump) throw new RangeError("shared guard out of rel32 reach");
  return {
    code: Uint8Array.of(
      0x4c, 0x8d, 0x1d, ...ripFrom(options.at, 7, options.data), // lea r11, [rip+record]
      ...jump, //                                                 jmp shared
    ),
    data: record,
  };
}

/**
 * The calling guard's code, shared by every patch (r11 holds the patch's record). It may push:
 * nothing is on the stack for the callee to find, and the stack is as it came whenever it leaves
 * for the original.
 */
function sharedCallingGuard(os: string, padding: number): Uint8Array {
  const [segment, sib, ...disp] = threadPointerOperand(os);
  const shadow = padding - 8; // the push of r11 already aligns rsp for the call
  const reserve = shadow ? [[0x48, 0x83, 0xec, shadow]] : []; // sub rsp, shadow (Windows' shadow space)
  const release = shadow ? [[0x48, 0x83, 0xc4, shadow]] : []; // add rsp, shadow
  return assembleListing([
    [0x41, 0x53], //                               push r11 (the record)
    [0x4d, 0x8b, 0x5b, RECORD.identity], //        mov r11, [r11+identity]: the identity word's address
    [0x4d, 0x8b, 0x1b], //                         mov r11, [r11]: the JS thread, 0 once the isolate ended
    [segment, 0x4c, 0x3b, 0x1c, sib, ...disp], //  cmp r11, qword fs:[0x10] (gs:[0x30] on Windows): this thread?
    [0x41, 0x5b], //                               pop r11: the record again (flags stay)
    jne("to_original"), //                         jne to_original: another thread
    [0x41, 0x80, 0x7b, RECORD.busy, 0x00], //      cmp byte [r11+busy], 0
    jne("to_original"), //                         jne to_original: re-entered, or retired
    [0x41, 0xc6, 0x43, RECORD.busy, 0x01], //      mov byte [r11+busy], 1
    [0x41, 0x53], //                               push r11: kept across the call; aligns rsp
    ...reserve,
    [0x41, 0xff, 0x53, RECORD.callback], //        call [r11+callback]
    ...release,
    [0x41, 0x5b], //                               pop r11
    [0x41, 0x80, 0x63, RECORD.busy, 0xfe], //      and byte [r11+busy], ~1: not running (retired stays)
    [0xc3], //                                     ret
    "to_original",
    [0x41, 0xff, 0x63, RECORD.original], //        jmp [r11+original]
  ]).bytes;
}

/** `jne rel32` to `label`. */
function jne(label: string): Line {
  return (place) => [0x0f, 0x85, ...i32le(place.label(label) - place.end)];
}

/** rip-relative displacement from the end of an instruction ending at `at + end` to `target`. */
function ripFrom(at: bigint, end: number, target: bigint): Uint8Array {
  const d = target - (at + BigInt(end));
  if (d < -(2n ** 31n) || d >= 2n ** 31n) throw new RangeError("guard data out of rip-relative reach");
  return i32le(Number(d));
}

/**
 * The guard that swaps the return address: for signatures that pass arguments on the stack.
 * Another thread (or any, once the isolate ended), the JS thread re-entering, or any call once the
 * patch is retired goes to `to_original`; otherwise the busy flag is
 * set, and the replacement returns to `after`. Only r11 and the flags change.
 */
function swappingGuard(options: GuardOptions): Uint8Array {
  const { at, data } = options;
  const [segment, sib, ...disp] = threadPointerOperand(options.os);
  const saved = data, busy = data + 8n;
  const rip = (p: Place, target: bigint) => ripFrom(at, p.end, target);
  const local = (p: Place, label: string) => rip(p, at + BigInt(p.label(label)));
  const { bytes } = assembleListing([
    (p) => [0x4c, 0x8b, 0x1d, ...local(p, "identity")], //   mov r11, [rip+identity]: the word's address
    [0x4d, 0x8b, 0x1b], //                                   mov r11, [r11]: the JS thread, 0 once ended
    [segment, 0x4c, 0x3b, 0x1c, sib, ...disp], //           cmp r11, qword fs:[0x10] (gs:[0x30] on Windows)
    jne("to_original"), //                                   jne to_original: another thread
    (p) => [0x80, 0x3d, ...rip(p, busy), 0x00], //           cmp byte [rip+busy], 0
    jne("to_original"), //                                   jne to_original: re-entered, or retired
    (p) => [0xc6, 0x05, ...rip(p, busy), 0x01], //           mov byte [rip+busy], 1
    [0x4c, 0x8b, 0x1c, 0x24], //                             mov r11, [rsp]
    (p) => [0x4c, 0x89, 0x1d, ...rip(p, saved)], //          mov [rip+saved], r11
    (p) => [0x4c, 0x8d, 0x1d, ...local(p, "after")], //      lea r11, [rip+after]
    [0x4c, 0x89, 0x1c, 0x24], //                             mov [rsp], r11: return to `after`
    (p) => [0xff, 0x25, ...local(p, "callback")], //         jmp [rip+callback]
    "after",
    (p) => [0x80, 0x25, ...rip(p, busy), 0xfe], //           and byte [rip+busy], ~1: not running
    (p) => [0xff, 0x25, ...rip(p, saved)], //                jmp [rip+saved]: back to the caller
    "to_original",
    (p) => [0xff, 0x25, ...local(p, "original")], //         jmp [rip+original]
    align(8, INT3),
    "identity",
    [...u64le(options.identity)],
    "callback",
    [...u64le(options.callback)],
    "original",
    [...u64le(options.original)],
  ]);
  if (bytes.length !== SWAP_SIZE) throw new RangeError(`the swapping guard takes ${bytes.length} bytes, not ${SWAP_SIZE}`);
  return bytes;
}
