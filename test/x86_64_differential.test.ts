/**
 * The x86-64 decoder against iced-x86, a complete disassembler: on every exported function of the
 * system's C, math and C++ libraries, whole (not only the entry the relocator reads: more
 * encodings, and it costs a few seconds), and on random bytes.
 */
import { readFileSync } from "node:fs";
import { log } from "node:console";
import {
  Decoder,
  DecoderOptions,
  FlowControl,
  Instruction as IcedInstruction,
  OpKind,
} from "iced-x86";
import { assert, test } from "./harness.ts";
import { elfFunctions, findLibrary } from "./elf_file.ts";
import { decode, type Instruction } from "../src/arch/x86_64/decoder.ts";
import { hexBytes } from "../src/errors.ts";

const LIBRARIES = ["libc.so.6", "libm.so.6", "libstdc++.so.6"];

/** Our decoding of one instruction, or the reason we refused it. */
function ours(code: Uint8Array, offset: number, address: bigint): Instruction | string {
  try {
    return decode(code, offset, address);
  } catch (error) {
    return (error as Error).message;
  }
}

/**
 * Asserts that ours agrees with iced's valid decoding of the same bytes. There is no list of
 * exceptions: every instruction iced decodes in 64-bit mode, ours decodes the same.
 */
function compare(
  mine: Instruction | string,
  iced: IcedInstruction,
  decoder: Decoder,
  where: string,
) {
  assert.ok(
    typeof mine !== "string",
    `${where}: iced decodes ${iced.toString()}, we refuse: ${mine}`,
  );
  const context = `${where} (${iced.toString()})`;
  assert.equal(mine.length, iced.length, `${context}: length`);

  const nearBranch = [OpKind.NearBranch16, OpKind.NearBranch32, OpKind.NearBranch64]
    .includes(iced.op0Kind);
  assert.equal(
    mine.branch?.target,
    nearBranch ? iced.nearBranchTarget : undefined,
    `${context}: branch`,
  );
  assert.equal(
    mine.ripRelative?.target,
    iced.isIpRelMemoryOperand ? iced.ipRelMemoryAddress : undefined,
    `${context}: RIP-relative target`,
  );
  if (mine.branch !== undefined || mine.ripRelative !== undefined) {
    const offsets = decoder.getConstantOffsets(iced);
    if (mine.branch) {
      assert.equal(mine.branch.relOffset, offsets.immediateOffset, `${context}: rel offset`);
    }
    if (mine.ripRelative) {
      assert.equal(
        mine.ripRelative.dispOffset,
        offsets.displacementOffset,
        `${context}: disp offset`,
      );
    }
    offsets.free();
  }

  const flow = iced.flowControl;
  const icedFlow = flow === FlowControl.Return
    ? "ret"
    : flow === FlowControl.UnconditionalBranch || flow === FlowControl.IndirectBranch
    ? "jmp"
    : "other";
  assert.equal(
    mine.flow === "ret" || mine.flow === "jmp" ? mine.flow : "other",
    icedFlow,
    `${context}: flow`,
  );
}

test("decoder agrees with iced-x86 on the functions of libc, libm and libstdc++", () => {
  let functions = 0;
  let bodies = 0;
  let instructions = 0;
  const icedInstruction = new IcedInstruction();
  for (const library of LIBRARIES) {
    const seen = new Set<bigint>();
    for (const fn of elfFunctions(readFileSync(findLibrary(library)))) {
      functions++;
      if (seen.has(fn.address)) continue;
      seen.add(fn.address);
      bodies++;
      const code = fn.bytes;
      const decoder = new Decoder(64, code, DecoderOptions.None);
      decoder.ip = fn.address;
      while (decoder.canDecode) {
        const offset = decoder.position;
        decoder.decodeOut(icedInstruction);
        if (icedInstruction.isInvalid) break;
        const address = fn.address + BigInt(offset);
        compare(
          ours(code, offset, address),
          icedInstruction,
          decoder,
          `${library} ${fn.name}+${offset}`,
        );
        instructions++;
      }
      decoder.free();
    }
  }
  icedInstruction.free();
  log(
    `differential: ${functions} function symbols, ${bodies} distinct bodies, ` +
      `${instructions} instructions agree with iced-x86`,
  );
  assert.ok(bodies > 5000 && instructions > 100_000);
});

test("decoder agrees with iced-x86 on random bytes", () => {
  const SEQUENCES = 500_000;
  const SIZE = 16;
  const bytes = randomInstructions(SEQUENCES, SIZE);
  const decoder = new Decoder(64, bytes, DecoderOptions.None);
  const icedInstruction = new IcedInstruction();
  let valid = 0;
  for (let i = 0; i < SEQUENCES; i++) {
    const address = 0x7f00_0000_0000n + BigInt(i * SIZE);
    decoder.position = i * SIZE;
    decoder.ip = address;
    decoder.decodeOut(icedInstruction);
    if (icedInstruction.isInvalid) continue;
    valid++;
    const code = bytes.subarray(i * SIZE, i * SIZE + SIZE);
    compare(ours(code, 0, address), icedInstruction, decoder, `random #${i} ${hexBytes(code)}`);
  }
  icedInstruction.free();
  decoder.free();
  log(
    `differential: ${SEQUENCES} random ${SIZE}-byte sequences, ${valid} valid for iced-x86, ` +
      "all agree",
  );
});

/**
 * Random bytes, most sequences starting with a prefix or an escape so that every opcode map gets
 * exercised, not only the one-byte map that uniformly random bytes land in.
 */
function randomInstructions(count: number, size: number): Uint8Array {
  // xorshift32: the same sequences on every run, so a failure can be replayed.
  let state = 0x2545f491;
  const random = (): number => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return state >>> 0;
  };
  const pick = <T>(items: readonly T[]): T => items[random() % items.length];
  const REX = [0x40, 0x41, 0x44, 0x48, 0x4c, 0x4f];
  const PREFIXES = [0x66, 0x67, 0xf2, 0xf3, 0xf0, 0x2e, 0x3e, 0x64, ...REX];
  const heads: (() => number[])[] = [
    () => [],
    () => Array.from({ length: 1 + random() % 3 }, () => pick(PREFIXES)),
    () => [pick([0x66, 0xf2, 0xf3, 0x48, 0x0f]), 0x0f],
    () => [0x0f],
    () => [pick([0x66, 0xf2, 0xf3, 0x48, 0x0f]), 0x0f, 0x38],
    () => [pick([0x66, 0xf2, 0xf3, 0x48, 0x0f]), 0x0f, 0x3a],
    () => [0xc4, (random() & 0xe0) | (1 + random() % 3)],
    () => [0xc5],
    () => [0x62, (random() & 0xf0) | pick([1, 2, 3, 5, 6]), random() | 0x04],
    () => [0x8f, (random() & 0xe0) | (8 + random() % 3)],
  ];
  const bytes = new Uint8Array(count * size);
  for (let i = 0; i < count; i++) {
    const sequence = bytes.subarray(i * size, (i + 1) * size);
    for (let j = 0; j < size; j++) sequence[j] = random();
    sequence.set(pick(heads)());
  }
  return bytes;
}
