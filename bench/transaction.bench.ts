/**
 * 1000 patches on 1000 distinct functions: one transaction against 1000 single patches, µs per
 * patch (apply + restore), and the protection changes each way. Two sets of functions:
 * - libc: 1000 exported functions of libc.so.6 spread over hundreds of pages, each redirected to
 *   its own trampoline (the only replacement safe for functions the runtime itself calls);
 * - assembled: 1000 small functions on a few pages of our own, each redirected to labs.
 */
import { readFileSync } from "node:fs";
import { redefine, RedefineError, restoreAll, transaction } from "../mod.ts";
import { codeBytesInUse, redefineToOriginal } from "../src/internal.ts";
import { platform } from "../platform/mod.ts";
import { elfFunctions, findLibrary } from "../test/elf_file.ts";
import { assemble } from "../test/native.ts";

const { os, runtime } = platform();
const COUNT = 1000;

function countProtects<T>(body: () => T): [T, number] {
  const protect = os.protect;
  let n = 0;
  os.protect = (start, length, protection) => {
    n++;
    protect(start, length, protection);
  };
  try {
    return [body(), n];
  } finally {
    os.protect = protect;
  }
}

function measure(name: string, apply: (i: number) => { restore(): void }) {
  // Warm-up, untimed: symbol lookups and scans are cached alike for both ways.
  transaction(() => Array.from({ length: COUNT }, (_, i) => apply(i)));
  restoreAll();
  const rounds: [number, number][] = [];
  let protects: [number, number] = [0, 0];
  for (let r = 0; r < 3; r++) {
    let t = performance.now();
    const [, single] = countProtects(() => {
      const patches = Array.from({ length: COUNT }, (_, i) => apply(i));
      for (const p of patches.reverse()) p.restore();
    });
    const oneByOne = performance.now() - t;
    t = performance.now();
    const [, batched] = countProtects(() => {
      transaction(() => Array.from({ length: COUNT }, (_, i) => apply(i)));
      restoreAll();
    });
    const together = performance.now() - t;
    rounds.push([oneByOne, together]);
    protects = [single, batched];
  }
  const best = (k: 0 | 1) => Math.min(...rounds.map((r) => r[k])) * 1000 / COUNT;
  console.log(
    `${runtime.name}: ${name.padEnd(10)} single ${best(0).toFixed(1).padStart(7)} µs/patch (${protects[0]} mprotect)   ` +
      `transaction ${best(1).toFixed(1).padStart(7)} µs/patch (${protects[1]} mprotect)   ratio ${(best(0) / best(1)).toFixed(1)}×   goal ≥ 10×`,
  );
}

// libc: the first COUNT exported functions an identity hook accepts.
const names: string[] = [];
for (const name of [...new Set(elfFunctions(readFileSync(findLibrary("libc.so.6"))).map((f) => f.name))].sort()) {
  if (names.length === COUNT) break;
  try {
    redefineToOriginal({ symbol: name, library: "libc.so.6", parameters: [], result: "void" }).restore();
    names.push(name);
  } catch (error) {
    if (!(error instanceof RedefineError)) throw error;
  }
}
measure("libc", (i) => redefineToOriginal({ symbol: names[i], library: "libc.so.6", parameters: [], result: "void" }));

// assembled: COUNT copies of `mov rax, rdi; ret` padded to 16 bytes, 4 pages' worth.
const body = [0x48, 0x89, 0xf8, 0xc3, ...Array(12).fill(0xcc)];
const pages = Math.ceil((COUNT * 16) / os.pageSize);
const blocks = Array.from({ length: Math.ceil(pages / 2) }, (_, b) =>
  assemble(Array.from({ length: Math.min(COUNT - b * (2 * os.pageSize / 16), 2 * os.pageSize / 16) }, () => body).flat()));
const addresses = blocks.flatMap((b) => Array.from({ length: 2 * os.pageSize / 16 }, (_, i) => b.address + BigInt(16 * i))).slice(0, COUNT);
const labs = os.symbolAddress("labs");
measure("assembled", (i) => redefine({ address: addresses[i], size: 16, parameters: ["i64"], result: "i64" }, labs));

// Executable memory per patch: trampolines of libc functions (identity hooks), then JS replacements
// of the assembled functions (trampoline and guard each; never of libc's, which the runtime calls).
// Slots freed by the rounds above wait a second in quarantine: wait it out, to count only these.
await new Promise((resolve) => setTimeout(resolve, 1100));
for (const [kind, apply] of [
  ["trampolines", (i: number) => redefineToOriginal({ symbol: names[i], library: "libc.so.6", parameters: [], result: "void" })],
  ["JS + guard", (i: number) => redefine({ address: addresses[i], size: 16, parameters: ["i64"], result: "i64" }, (x) => x)],
] as const) {
  const before = codeBytesInUse();
  transaction(() => names.slice(0, 200).map((_, i) => apply(i)));
  const per = (codeBytesInUse() - before) / 200;
  restoreAll();
  await new Promise((resolve) => setTimeout(resolve, 1100));
  console.log(`${runtime.name}: executable memory per patch, ${kind}: ${per.toFixed(1)} bytes   goal ≤ 64 on average`);
}
