/**
 * The guard stub that stands in front of a JS replacement (x86-64, glibc's thread pointer).
 *
 * A JS replacement can only run on the JS thread, and must not be re-entered while the runtime is
 * dispatching it (Deno calls `strlen` there, for one). The guard sends every other call to the
 * original: calls from other threads, and calls from the JS thread while the replacement is
 * already running. It must clear its busy flag when the replacement returns. When the signature
 * passes nothing on the stack it simply calls the replacement (returns stay predicted); otherwise
 * it must not push anything (stack arguments must stay where the callee expects them), so it keeps
 * the caller's return address in a per-patch slot and puts its own return point in its place.
 *
 * It touches only r11 (scratch, never an argument) and the flags; every argument register, `al`
 * (the vector count of varargs calls) and the stack arguments reach the replacement or the
 * original untouched, and the replacement's results (rax, rdx, xmm0, xmm1) reach the caller.
 */
import type { GuardOptions } from "../mod.ts";
import { RedefineError } from "../../errors.ts";
import { i32le, INT3, u64le } from "./writer.ts";

/** Bytes of code (with its three literals). */
export const GUARD_SIZE = 120;
/** Bytes of read+write data: the saved return address, then the busy flag. */
export const GUARD_DATA_SIZE = 16;

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

/** The guard's bytes for `options`. */
export function guardStub(options: GuardOptions): Uint8Array {
  const padding = callPadding(options.os, options.signature.parameters);
  return padding === null ? swappingGuard(options) : callingGuard(options, padding);
}

/** Shared layout: the checks, then either way of running the replacement, then the literals. */
const THREAD = 96, CALLBACK = 104, ORIGINAL = 112;

/** rip-relative displacement from the end of an instruction ending at `at + end` to `target`. */
function ripFrom(at: bigint, end: number, target: bigint): Uint8Array {
  const d = target - (at + BigInt(end));
  if (d < -(2n ** 31n) || d >= 2n ** 31n) throw new RangeError("guard data out of rip-relative reach");
  return i32le(Number(d));
}

function finish(code: Uint8Array, options: GuardOptions): Uint8Array {
  const out = new Uint8Array(GUARD_SIZE).fill(INT3);
  out.set(code, 0);
  out.set(u64le(options.jsThread), THREAD);
  out.set(u64le(options.callback), CALLBACK);
  out.set(u64le(options.original), ORIGINAL);
  return out;
}

/**
 * The first 42 bytes of both guards: another thread, or the JS thread re-entering, goes to
 * `toOriginal`; otherwise the busy flag is set. Only r11 and the flags change.
 */
function checks(options: GuardOptions, toOriginal: number): number[] {
  const { at } = options;
  const [segment, sib, ...disp] = threadPointerOperand(options.os);
  const busy = options.data + 8n;
  return [
    segment, 0x4c, 0x8b, 0x1c, sib, ...disp, //               0 mov r11, qword fs:[0x10] (gs:[0x30] on Windows)
    0x4c, 0x3b, 0x1d, ...ripFrom(at, 16, at + BigInt(THREAD)), // 9 cmp r11, [rip+thread]
    0x0f, 0x85, ...i32le(toOriginal - 22), //                 16 jne to_original: another thread
    0x80, 0x3d, ...ripFrom(at, 29, busy), 0x00, //            22 cmp byte [rip+busy], 0
    0x0f, 0x85, ...i32le(toOriginal - 35), //                 29 jne to_original: re-entered
    0xc6, 0x05, ...ripFrom(at, 42, busy), 0x01, //            35 mov byte [rip+busy], 1
  ];
}

/** The guard that calls the replacement: for signatures with nothing on the stack. */
function callingGuard(options: GuardOptions, padding: number): Uint8Array {
  const { at } = options;
  const busy = options.data + 8n;
  const local = (end: number, offset: number) => ripFrom(at, end, at + BigInt(offset));
  return finish(Uint8Array.of(
    ...checks(options, 64), //                          0 thread and re-entrance checks
    0x48, 0x83, 0xec, padding, //                      42 sub rsp, padding (alignment, shadow space)
    0xff, 0x15, ...local(52, CALLBACK), //             46 call [rip+callback]
    0x48, 0x83, 0xc4, padding, //                      52 add rsp, padding
    0xc6, 0x05, ...ripFrom(at, 63, busy), 0x00, //     56 mov byte [rip+busy], 0
    0xc3, //                                           63 ret
    0xff, 0x25, ...local(70, ORIGINAL), //             64 to_original: jmp [rip+original]
  ), options);
}

/** The guard that swaps the return address: for signatures that pass arguments on the stack. */
function swappingGuard(options: GuardOptions): Uint8Array {
  const { at, data } = options;
  const saved = data, busy = data + 8n;
  const local = (end: number, offset: number) => ripFrom(at, end, at + BigInt(offset));
  return finish(Uint8Array.of(
    ...checks(options, 83), //                          0 thread and re-entrance checks
    0x4c, 0x8b, 0x1c, 0x24, //                         42 mov r11, [rsp]
    0x4c, 0x89, 0x1d, ...ripFrom(at, 53, saved), //    46 mov [rip+saved], r11
    0x4c, 0x8d, 0x1d, ...local(60, 70), //             53 lea r11, [rip+after]
    0x4c, 0x89, 0x1c, 0x24, //                         60 mov [rsp], r11: return to `after`
    0xff, 0x25, ...local(70, CALLBACK), //             64 jmp [rip+callback]
    0xc6, 0x05, ...ripFrom(at, 77, busy), 0x00, //     70 after: mov byte [rip+busy], 0
    0xff, 0x25, ...ripFrom(at, 83, saved), //          77 jmp [rip+saved]: back to the caller
    0xff, 0x25, ...local(89, ORIGINAL), //             83 to_original: jmp [rip+original]
  ), options);
}
