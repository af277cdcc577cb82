/**
 * The x86-64 length decoder against iced-x86 (a complete disassembler, compiled to WebAssembly)
 * on the same 1 MiB of libc's text in the same process: ns per instruction of a linear sweep, and
 * a check that both give every instruction the same length. Run by `npm run bench` under both
 * runtimes; without x86-64 glibc it has nothing to measure.
 */
import { Decoder, DecoderOptions, Instruction } from "iced-x86";
import { platform } from "../platform/mod.ts";
import { PROT_EXEC } from "../platform/mod.ts";
import { instructionLength } from "../src/arch/x86_64/decoder.ts";
import { x86_64 } from "../src/arch/x86_64/mod.ts";

const { runtime, os } = platform();
const SIZE = 1 << 20;

/** The first MiB of libc's executable mapping, copied out of the running process, if there is one. */
function libcText(): { code: Uint8Array; address: bigint } | null {
  const text = os.mappings().find((m) => /\/libc\.so\.6$/.test(m.path) && (m.protection & PROT_EXEC) !== 0);
  if (!text) return null;
  const length = Math.min(SIZE, Number(text.end - text.start));
  return { code: runtime.view(text.start, length).slice(), address: text.start };
}

/** Instructions of a linear sweep with ours: one byte on when bytes do not decode. */
function sweepOurs(code: Uint8Array): number {
  let count = 0;
  for (let offset = 0; offset < code.length; count++) {
    const length = instructionLength(code, offset);
    offset += length > 0 ? length : 1;
  }
  return count;
}

/** The same sweep with iced-x86, reusing one instruction object (its fastest use from JS). */
function sweepIced(code: Uint8Array, address: bigint): number {
  const decoder = new Decoder(64, code, DecoderOptions.None);
  decoder.ip = address;
  const insn = new Instruction();
  let count = 0;
  while (decoder.canDecode) {
    decoder.decodeOut(insn);
    count++;
  }
  insn.free();
  decoder.free();
  return count;
}

/** Lengths at every instruction iced decodes as valid, compared with ours: the disagreements. */
function disagreements(code: Uint8Array, address: bigint): { compared: number; differ: number } {
  const decoder = new Decoder(64, code, DecoderOptions.None);
  decoder.ip = address;
  const insn = new Instruction();
  let compared = 0, differ = 0;
  while (decoder.canDecode) {
    const offset = decoder.position;
    decoder.decodeOut(insn);
    if (insn.isInvalid) continue;
    compared++;
    if (instructionLength(code, offset) !== insn.length) differ++;
  }
  insn.free();
  decoder.free();
  return { compared, differ };
}

/** Nanoseconds per instruction of `sweep`, median of interleaved rounds. */
function perInstruction(sweeps: (() => number)[], rounds = 9): number[] {
  const times: number[][] = sweeps.map(() => []);
  for (let r = 0; r < rounds; r++) {
    sweeps.forEach((sweep, i) => {
      const start = performance.now();
      const count = sweep();
      times[i].push(((performance.now() - start) * 1e6) / count);
    });
  }
  return times.map((xs) => xs.sort((x, y) => x - y)[Math.floor(xs.length / 2)]);
}

const text = runtime.arch === "x86_64" || runtime.arch === "x64" ? libcText() : null;
if (text === null) {
  console.log(`${runtime.name}: decoder bench: needs an x86-64 process with libc.so.6 mapped`);
} else {
  const { code, address } = text;
  const { compared, differ } = disagreements(code, address);
  const count = sweepOurs(code);
  // A whole-region scan as the entry checks make it: some bytes could branch into the middle of
  // the region, so every instruction is decoded.
  const from = address + BigInt(code.length / 2), to = from + 16n;
  const [ours, iced, scan] = perInstruction([
    () => sweepOurs(code),
    () => sweepIced(code, address),
    () => (x86_64.branchesInto(code, address, from, to), count),
  ]);
  const pad = (s: string, n: number) => s.padEnd(n);
  const row = (name: string, mine: number, base: number, goal: number) => {
    const ratio = mine / base;
    console.log(
      `${runtime.name}: ${pad(name, 40)} ${pad(mine.toFixed(1) + " ns/insn", 16)} ` +
        `${pad(base.toFixed(1) + " ns/insn", 16)} ${ratio.toFixed(2)}   ≤ ${goal} ${ratio <= goal ? "met" : "MISSED"}`,
    );
  };
  console.log(`\n${runtime.name}: ${pad("benchmark", 40)} ${pad("ours", 16)} ${pad("baseline", 16)} ratio  goal`);
  row("x86-64 length decoder / iced-x86", ours, iced, 1.0);
  row("branchesInto over the region / iced-x86", scan, iced, 1.0);
  console.log(`${runtime.name}: ${compared} instructions of libc compared with iced-x86, ${differ} lengths differ`);
  if (differ !== 0) throw new Error(`${differ} lengths differ from iced-x86`);
}
