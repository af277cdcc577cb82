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
 * Before anything else both send the runtime's own calls to the original: a call returning into the
 * runtime's executable (`RuntimeCode`), unless into the part of it that makes the FFI's calls.
 * V8 calls `getpid` from there during garbage collection, where entering JS aborts the process;
 * the program's FFI calls come from that part (libffi) or from JIT code outside the executable.
 *
 * Both touch only r11 (scratch, never an argument) and the flags; every argument register, `al`
 * (the vector count of varargs calls) and the stack arguments reach the replacement or the
 * original untouched, and the replacement's results (rax, rdx, xmm0, xmm1) reach the caller.
 */
import type { GuardLayout, GuardOptions, RuntimeCode } from "../types.ts";
import { RedefineError } from "../../errors.ts";
import { align, assembleListing, type Line, type Place } from "../listing.ts";
import { i32le, INT3, putI32, putJmpRel32, u64le } from "./writer.ts";

/** The swapping guard: bytes of code (with its seven literals). */
const SWAP_SIZE = 208;
/** The swapping guard's data: the saved return address, then the busy flag. */
const SWAP_DATA_SIZE = 16;
/** A calling guard's thunk: `lea r11, [rip+record]; jmp shared`. */
const THUNK_SIZE = 12;
/** A calling guard's record: the identity word's address, callback, original, busy flag, the runtime's code. */
const RECORD = {
  identity: 0, callback: 8, original: 16, busy: 24, textStart: 32, textEnd: 40, ffiStart: 48, ffiEnd: 56, size: 64,
};

/**
 * The thread pointer's home: glibc keeps the thread's own address at `fs:[0x10]` (what
 * `pthread_self()` returns); Windows keeps the TEB's self pointer at `gs:[0x30]`; macOS keeps
 * `pthread_self` in slot 0 of the thread-specific data at `gs:[0]` (not run on a Mac).
 */
export function threadPointerOperand(os: string): [segment: number, sib: number, ...disp: number[]] {
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

/** A function returning its own return address, read where the guard reads it: `[rsp]` at entry. */
export function returnAddressReader(): Uint8Array {
  return Uint8Array.of(
    0x48, 0x8b, 0x04, 0x24, // mov rax, [rsp]
    0xc3, //                  ret
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
  // Counted in place: asked for every guard made.
  let integers = 0;
  for (let i = 0; i < parameters.length; i++) if (INTEGER_CLASS.has(parameters[i]!)) integers++;
  return integers <= 6 && parameters.length - integers <= 8 ? 8 : null;
}

/** What a patch's guard takes: see `Arch.guard.layout`. */
export function guardLayout(os: string, signature: { parameters: readonly string[] }): GuardLayout {
  const padding = callPadding(os, signature.parameters);
  return padding === null
    ? { size: SWAP_SIZE, dataSize: SWAP_DATA_SIZE, busyOffset: 8, shared: null }
    : { size: THUNK_SIZE, dataSize: RECORD.size, busyOffset: RECORD.busy, shared: sharedCallingGuard(os, padding) };
}

/** The guard's code for `options`. */
export function guardStub(options: GuardOptions): Uint8Array {
  // Which guard, without assembling the shared code again (`options.shared` is where it is).
  if (callPadding(options.os, options.signature.parameters) === null) return swappingGuard(options);
  if (options.shared === undefined) throw new RangeError("the calling guard needs its shared code placed");
  const code = new Uint8Array(THUNK_SIZE);
  code.set([0x4c, 0x8d, 0x1d]); //                           lea r11, [rip+record]
  putI32(code, 3, ripDisplacement(options.at, 7, options.data));
  if (!putJmpRel32(code, 7, options.at + 7n, options.shared)) { // jmp shared
    throw new RangeError("shared guard out of rel32 reach");
  }
  return code;
}

/**
 * The guard's first data for `options`, written into `into` (the live data, or any array): the
 * swapping guard's zeros, or the calling guard's record. In place, with no array of its own: a
 * guard is made for every JS replacement, and under Deno each small array costs a fresh buffer.
 */
export function guardData(options: GuardOptions, into: Uint8Array): void {
  if (callPadding(options.os, options.signature.parameters) === null) {
    into.fill(0, 0, SWAP_DATA_SIZE);
    return;
  }
  const record = new DataView(into.buffer, into.byteOffset, RECORD.size);
  record.setBigUint64(RECORD.identity, options.identity, true);
  record.setBigUint64(RECORD.callback, options.callback, true);
  record.setBigUint64(RECORD.original, options.original, true);
  record.setBigUint64(RECORD.busy, 0n, true);
  record.setBigUint64(RECORD.textStart, options.runtimeCode.start, true);
  record.setBigUint64(RECORD.textEnd, options.runtimeCode.end, true);
  record.setBigUint64(RECORD.ffiStart, options.runtimeCode.ffiStart, true);
  record.setBigUint64(RECORD.ffiEnd, options.runtimeCode.ffiEnd, true);
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
  // After each `cmp`, r11 gets the record back from the stack (a `mov` keeps the flags).
  const againstRecord = (field: number): Line[] => [
    [0x4d, 0x8b, 0x5b, field], //                  mov r11, [r11+field]
    [0x4c, 0x39, 0x5c, 0x24, 0x08], //             cmp [rsp+8], r11: the caller's return address
    [0x4c, 0x8b, 0x1c, 0x24], //                   mov r11, [rsp]: the record
  ];
  return assembleListing([
    [0x41, 0x53], //                               push r11 (the record)
    ...againstRecord(RECORD.textStart),
    jcc(JB, "elsewhere"), //                       jb elsewhere: below the runtime's code
    ...againstRecord(RECORD.textEnd),
    jcc(JAE, "elsewhere"), //                      jae elsewhere: above it
    ...againstRecord(RECORD.ffiStart),
    jcc(JB, "runtime_call"), //                    jb runtime_call: the runtime's own call
    ...againstRecord(RECORD.ffiEnd),
    jcc(JAE, "runtime_call"), //                   jae runtime_call: so is this; inside, its FFI's
    "elsewhere",
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
    "runtime_call",
    [0x41, 0x5b], //                               pop r11: the record
    "to_original",
    [0x41, 0xff, 0x63, RECORD.original], //        jmp [r11+original]
  ]).bytes;
}

/** The second opcode bytes of `jb`, `jae` and `jne` with a rel32 operand. */
const JB = 0x82, JAE = 0x83, JNE = 0x85;

/** The conditional jump `condition` (`JB`, `JAE`, `JNE`), rel32, to `label`. */
function jcc(condition: number, label: string): Line {
  return (place) => [0x0f, condition, ...i32le(place.label(label) - place.end)];
}

/** `jne rel32` to `label`. */
function jne(label: string): Line {
  return jcc(JNE, label);
}

/** rip-relative displacement from the end of an instruction ending at `at + end` to `target`. */
function ripDisplacement(at: bigint, end: number, target: bigint): number {
  const d = target - (at + BigInt(end));
  if (d < -(2n ** 31n) || d >= 2n ** 31n) throw new RangeError("guard data out of rip-relative reach");
  return Number(d);
}

/** The same displacement's bytes. */
function ripFrom(at: bigint, end: number, target: bigint): Uint8Array {
  return i32le(ripDisplacement(at, end, target));
}

/**
 * The guard that swaps the return address: for signatures that pass arguments on the stack.
 * Another thread, or the JS thread re-entering, goes to `to_original`; otherwise the busy flag is
 * set, and the replacement returns to `after`. Only r11 and the flags change.
 */
function swappingGuard(options: GuardOptions): Uint8Array {
  const { at, data } = options;
  const [segment, sib, ...disp] = threadPointerOperand(options.os);
  const saved = data, busy = data + 8n;
  const rip = (p: Place, target: bigint) => ripFrom(at, p.end, target);
  const local = (p: Place, label: string) => rip(p, at + BigInt(p.label(label)));
  const { bytes } = assembleListing([
    [0x4c, 0x8b, 0x1c, 0x24], //                             mov r11, [rsp]: the caller's return address
    (p) => [0x4c, 0x3b, 0x1d, ...local(p, "text_start")], // cmp r11, [rip+text_start]
    jcc(JB, "elsewhere"), //                                 jb elsewhere: below the runtime's code
    (p) => [0x4c, 0x3b, 0x1d, ...local(p, "text_end")], //   cmp r11, [rip+text_end]
    jcc(JAE, "elsewhere"), //                                jae elsewhere: above it
    (p) => [0x4c, 0x3b, 0x1d, ...local(p, "ffi_start")], //  cmp r11, [rip+ffi_start]
    jcc(JB, "to_original"), //                               jb to_original: the runtime's own call
    (p) => [0x4c, 0x3b, 0x1d, ...local(p, "ffi_end")], //    cmp r11, [rip+ffi_end]
    jcc(JAE, "to_original"), //                              jae to_original: so is this; inside, its FFI's
    "elsewhere",
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
    ...runtimeCodeLiterals(options.runtimeCode),
  ]);
  if (bytes.length !== SWAP_SIZE) throw new RangeError(`the swapping guard takes ${bytes.length} bytes, not ${SWAP_SIZE}`);
  return bytes;
}

/** The swapping guard's literals for `code`. */
function runtimeCodeLiterals(code: RuntimeCode): Line[] {
  return [code.start, code.end, code.ffiStart, code.ffiEnd].flatMap((value, i) => [
    ["text_start", "text_end", "ffi_start", "ffi_end"][i]!,
    [...u64le(value)],
  ]);
}
