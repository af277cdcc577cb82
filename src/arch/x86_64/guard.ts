/**
 * The guard stub that stands in front of a JS replacement (x86-64, glibc's thread pointer).
 *
 * A JS replacement can only run on the JS thread, and must not be re-entered while the runtime is
 * dispatching it (Deno calls `strlen` there, for one). The guard sends every other call to the
 * original: calls from other threads, and calls from the JS thread while the replacement is
 * already running. To know when the replacement returns without pushing anything (arguments on
 * the stack must stay where the callee expects them), it keeps the caller's return address in a
 * per-patch slot and puts its own return point in its place.
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

/** The guard's bytes for `options`. */
export function guardStub(options: GuardOptions): Uint8Array {
  const { at, data } = options;
  const [segment, sib, ...disp] = threadPointerOperand(options.os);
  const saved = data, busy = data + 8n;
  const THREAD = 96, CALLBACK = 104, ORIGINAL = 112, AFTER = 70, TO_ORIGINAL = 83;
  // A rip-relative operand counts from the end of its instruction (immediates included).
  const rip = (end: number, target: bigint) => {
    const d = target - (at + BigInt(end));
    if (d < -(2n ** 31n) || d >= 2n ** 31n) throw new RangeError("guard data out of rip-relative reach");
    return i32le(Number(d));
  };
  const local = (end: number, offset: number) => rip(end, at + BigInt(offset));
  const code = Uint8Array.of(
    segment, 0x4c, 0x8b, 0x1c, sib, ...disp, //        0 mov r11, qword fs:[0x10] (gs:[0x30] on Windows)
    0x4c, 0x3b, 0x1d, ...local(16, THREAD), //           9 cmp r11, [rip+thread]
    0x0f, 0x85, ...i32le(TO_ORIGINAL - 22), //          16 jne to_original: another thread
    0x80, 0x3d, ...rip(29, busy), 0x00, //              22 cmp byte [rip+busy], 0
    0x0f, 0x85, ...i32le(TO_ORIGINAL - 35), //          29 jne to_original: re-entered
    0xc6, 0x05, ...rip(42, busy), 0x01, //              35 mov byte [rip+busy], 1
    0x4c, 0x8b, 0x1c, 0x24, //                          42 mov r11, [rsp]
    0x4c, 0x89, 0x1d, ...rip(53, saved), //             46 mov [rip+saved], r11
    0x4c, 0x8d, 0x1d, ...local(60, AFTER), //           53 lea r11, [rip+after]
    0x4c, 0x89, 0x1c, 0x24, //                          60 mov [rsp], r11: return to `after`
    0xff, 0x25, ...local(70, CALLBACK), //              64 jmp [rip+callback]
    0xc6, 0x05, ...rip(77, busy), 0x00, //              70 after: mov byte [rip+busy], 0
    0xff, 0x25, ...rip(83, saved), //                   77 jmp [rip+saved]: back to the caller
    0xff, 0x25, ...local(89, ORIGINAL), //              83 to_original: jmp [rip+original]
  );
  const out = new Uint8Array(GUARD_SIZE).fill(INT3);
  out.set(code, 0);
  out.set(u64le(options.jsThread), THREAD);
  out.set(u64le(options.callback), CALLBACK);
  out.set(u64le(options.original), ORIGINAL);
  return out;
}
