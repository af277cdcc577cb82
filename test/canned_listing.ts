/**
 * Test-side helpers for the canned replacements: the reference x86-64 disassembly of their code,
 * the encoder of the running machine, and placing canned code in executable memory to call it.
 */
import { Decoder, DecoderOptions, FastFormatter } from "iced-x86";
import { cannedCode as x86_64Code } from "../src/arch/x86_64/canned.ts";
import { cannedCode as aarch64Code } from "../src/arch/aarch64/canned.ts";
import type { CannedSpec, CannedValue } from "../src/arch/canned.ts";
import { CANNED_DATA } from "../src/arch/canned.ts";
import { CodePool } from "../src/code_memory.ts";
import { platform } from "../platform/mod.ts";
import { isArm64, runtime } from "./native.ts";
import type { Signature } from "../src/signature.ts";
import { h } from "./objdump_aarch64.ts";

/** iced-x86's text of each instruction in the first `length` bytes of `code` placed at `address`. */
export function disassemble(code: Uint8Array, address: bigint, length = code.length): string[] {
  const decoder = new Decoder(64, code.subarray(0, length), DecoderOptions.None);
  decoder.ip = address;
  const formatter = new FastFormatter();
  const lines: string[] = [];
  while (decoder.canDecode) lines.push(formatter.format(decoder.decode()));
  decoder.free();
  formatter.free();
  return lines;
}

/** The little-endian quads of `code` from `offset` on. */
export function quads(code: Uint8Array, offset: number): bigint[] {
  const view = new DataView(code.buffer, code.byteOffset + offset, code.length - offset);
  return Array.from({ length: view.byteLength / 8 }, (_, i) => view.getBigUint64(i * 8, true));
}

/** An integer value as canned code takes it. */
export function integer(value: bigint): CannedValue {
  return { register: "integer", bits: BigInt.asUintN(64, value) };
}

/** The bits of a double. */
export function f64(value: number): CannedValue {
  return { register: "f64", bits: new BigUint64Array(new Float64Array([value]).buffer)[0] };
}

/** The bits of a float. */
export function f32(value: number): CannedValue {
  return { register: "f32", bits: BigInt(new Uint32Array(new Float32Array([value]).buffer)[0]) };
}

const pool = new CodePool(platform());

/** Canned code placed in executable memory on this machine, with a view of its data block. */
export interface Placed {
  readonly address: bigint;
  readonly data: bigint;
  /** The call counter, read atomically. */
  calls(): bigint;
  /** Sets the data block's `original`. */
  setOriginal(address: bigint): void;
}

/** Places the running machine's canned code for `spec` (and `os`) and returns where it is. */
export function place(spec: CannedSpec, os = runtime.os): Placed {
  const plan = (isArm64 ? aarch64Code : x86_64Code)(spec, os);
  const slot = pool.allocate(0n, 2n ** 62n, plan.size, plan.dataSize);
  if (!slot) throw new Error("no executable memory for the canned code");
  pool.write(slot, plan.encode(slot.address, slot.data));
  const view = runtime.view(slot.data, plan.dataSize);
  const words = new BigUint64Array(view.buffer, view.byteOffset, plan.dataSize / 8);
  return {
    address: slot.address,
    data: slot.data,
    calls: () => Atomics.load(words, CANNED_DATA.calls / 8),
    setOriginal: (address) => Atomics.store(words, CANNED_DATA.original / 8, address),
  };
}

/** Places machine code of the tests' own (a fake original, an adapter) in executable memory. */
export function placeCode(code: Uint8Array): bigint {
  const slot = pool.allocate(0n, 2n ** 62n, code.length);
  if (!slot) throw new Error("no executable memory");
  pool.write(slot, code);
  return slot.address;
}

/** A JS callable for native code at `address`. */
export function callable(address: bigint, signature: Signature): (...args: unknown[]) => unknown {
  return runtime.fnPointer(address, signature);
}

/** The aarch64 counter loop at the start of every canned function, with its data block at `data`. */
export function countListing(at: bigint, data: bigint): string[] {
  return [
    `adrp x16, ${h(data - data % 4096n)}`,
    `add x16, x16, #${h(data % 4096n)}`,
    "ldxr x17, [x16]",
    "add x9, x17, #0x1",
    "stxr w15, x9, [x16]",
    `cbnz w15, ${h(at + 8n)}`,
  ];
}

