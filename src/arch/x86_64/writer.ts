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

const TWO_32 = 2n ** 32n;

/**
 * Writes the low `size` bytes of the integer `value` (two's complement when negative) at
 * `out[at]`, little-endian. Arithmetic, not a DataView: a view of a small array costs more than
 * the array (it makes the array's buffer real), and an encoder runs a few times a patch.
 */
function putLittleEndian(out: Uint8Array, at: number, value: number, size: number): void {
  let rest = value < 0 ? value + 2 ** (8 * size) : value;
  for (let i = 0; i < size; i++) {
    out[at + i] = rest % 256;
    rest = Math.floor(rest / 256);
  }
}

/** Writes the signed 32-bit `value` at `out[at]`, little-endian. */
export function putI32(out: Uint8Array, at: number, value: number): void {
  putLittleEndian(out, at, value, 4);
}

/** Writes the 64-bit `value` at `out[at]`, little-endian, in two 32-bit halves. */
export function putU64(out: Uint8Array, at: number, value: bigint): void {
  const bits = BigInt.asUintN(64, value);
  putLittleEndian(out, at, Number(bits % TWO_32), 4);
  putLittleEndian(out, at + 4, Number(bits / TWO_32), 4);
}

/** Little-endian bytes of a 64-bit value. */
export function u64le(value: bigint): Uint8Array {
  const out = new Uint8Array(8);
  putU64(out, 0, value);
  return out;
}

/** Little-endian bytes of a signed 32-bit value. */
export function i32le(value: number): Uint8Array {
  const out = new Uint8Array(4);
  putI32(out, 0, value);
  return out;
}

/**
 * Writes `jmp rel32` from `from` to `to` at `out[at]`; false (nothing written) when `to` is further
 * than ±2 GiB.
 */
export function putJmpRel32(out: Uint8Array, at: number, from: bigint, to: bigint): boolean {
  const disp = rel32(from + BigInt(JMP_REL32_SIZE), to);
  if (disp === null) return false;
  out[at] = 0xe9; // jmp rel32
  putI32(out, at + 1, disp);
  return true;
}

/** `jmp rel32` at `from` to `to`, or null when `to` is further than ±2 GiB. */
export function jmpRel32(from: bigint, to: bigint): Uint8Array | null {
  const jump = new Uint8Array(JMP_REL32_SIZE);
  return putJmpRel32(jump, 0, from, to) ? jump : null;
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
  putLittleEndian(out, 0, Number(value), 4);
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

/** `endbr64`, the CET landing pad that must stay at the entry of functions built with IBT. */
export const ENDBR64: Uint8Array = Uint8Array.of(0xf3, 0x0f, 0x1e, 0xfa);

/** True when `code` starts with `endbr64`. */
export function startsWithEndbr64(code: Uint8Array): boolean {
  return code.length >= 4 && ENDBR64.every((b, i) => code[i] === b);
}

/** `int3` filler: a stray jump into padding traps instead of running garbage. */
export const INT3 = 0xcc;
