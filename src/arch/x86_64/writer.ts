/**
 * x86-64 jump and call encoders. Pure: addresses in, bytes out. Every form here leaves all
 * general-purpose registers and flags untouched, so it can sit at a function's entry where the
 * arguments are live.
 */

/** Length of `jmp rel32`. */
export const JMP_REL32_SIZE = 5;
/** Length of `jmp qword [rip+0]` followed by its 8-byte target. */
export const JMP_ABS_SIZE = 14;
/** Length of `pushAddress`'s sequence. */
export const PUSH_ADDRESS_SIZE = 13;

const INT32_MIN = -(2n ** 31n);
const INT32_MAX = 2n ** 31n - 1n;

/** The displacement a rel32 operand needs to reach `to` from the end of an instruction at `end`. */
export function rel32(end: bigint, to: bigint): number | null {
  const delta = to - end;
  return delta >= INT32_MIN && delta <= INT32_MAX ? Number(delta) : null;
}

/** True when an instruction of `length` bytes at `from` can reach `to` with a rel32 operand. */
export function reachesRel32(from: bigint, length: number, to: bigint): boolean {
  return rel32(from + BigInt(length), to) !== null;
}

/** Little-endian bytes of a 64-bit value. */
export function u64le(value: bigint): Uint8Array {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt.asUintN(64, value), true);
  return out;
}

/** Little-endian bytes of a signed 32-bit value. */
export function i32le(value: number): Uint8Array {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setInt32(0, value, true);
  return out;
}

/** `jmp rel32` at `from` to `to`, or null when `to` is further than ±2 GiB. */
export function jmpRel32(from: bigint, to: bigint): Uint8Array | null {
  const disp = rel32(from + BigInt(JMP_REL32_SIZE), to);
  if (disp === null) return null;
  const jump = Uint8Array.of(
    0xe9, 0, 0, 0, 0, // jmp rel32
  );
  // Written in place: one array per entry jump (a thousand-patch transaction makes a thousand).
  new DataView(jump.buffer).setInt32(1, disp, true);
  return jump;
}

/** `jmp qword [rip+0]` with the absolute target inline: reaches anywhere, clobbers nothing. */
export function jmpAbs(to: bigint): Uint8Array {
  return Uint8Array.of(
    0xff, 0x25, 0, 0, 0, 0, // jmp qword [rip+0]
    ...u64le(to), //         dq to
  );
}

/**
 * Pushes the 64-bit `value` as a `call` pushes its return address, touching no register and no
 * flag: `push imm32` sign-extends, so the high half is written over afterwards.
 */
export function pushAddress(value: bigint): Uint8Array {
  const bits = BigInt.asUintN(64, value);
  const low = bits % 2n ** 32n, high = bits / 2n ** 32n;
  return Uint8Array.of(
    0x68, ...u32le(low), //                    push imm32 (the low half, sign-extended)
    0xc7, 0x44, 0x24, 0x04, ...u32le(high), // mov dword [rsp+4], imm32 (the high half)
  );
}

/** Little-endian bytes of an unsigned 32-bit value. */
function u32le(value: bigint): Uint8Array {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, Number(value), true);
  return out;
}

/** Length of `jmp qword [rip+disp32]`. */
export const JMP_INDIRECT_SIZE = 6;

/** `jmp qword [rip+disp32]` at `from`, through the 8-byte pointer at `slot`. */
export function jmpIndirect(from: bigint, slot: bigint): Uint8Array {
  const disp = rel32(from + BigInt(JMP_INDIRECT_SIZE), slot);
  if (disp === null) throw new RangeError(`slot ${slot} out of rip-relative reach of ${from}`);
  return Uint8Array.of(
    0xff, 0x25, ...i32le(disp), // jmp qword [rip+disp32]
  );
}

/** The shortest jump from `from` to `to`: rel32 when in range, else the absolute form. */
export function jmpNearest(from: bigint, to: bigint): Uint8Array {
  return jmpRel32(from, to) ?? jmpAbs(to);
}

/** `endbr64`, the CET landing pad that must stay at the entry of functions built with IBT. */
export const ENDBR64: Uint8Array = Uint8Array.of(0xf3, 0x0f, 0x1e, 0xfa);

/** True when `code` starts with `endbr64`. */
export function startsWithEndbr64(code: Uint8Array): boolean {
  return code.length >= 4 && ENDBR64.every((b, i) => code[i] === b);
}

/** `int3` filler: a stray jump into padding traps instead of running garbage. */
export const INT3 = 0xcc;
