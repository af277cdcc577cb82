/**
 * Many patches at once, µs per patch (install + restore), each figure against the cheapest way to
 * do the same job:
 * - 1000 native redirects of small functions in one transaction, then `restoreAll()`, against the
 *   bare writes of the same entry jumps and back (one all-or-nothing write each way, no checks);
 * - the same with JS replacements, against the same writes plus making and closing 1000 bare
 *   runtime callbacks (what the runtime charges for a JS function native code can call);
 * - one transaction against 1000 single patches, on 1000 libc functions spread over hundreds of
 *   pages (each redirected to its own trampoline: the only replacement safe for functions the
 *   runtime itself calls) and on the small functions;
 * - executable memory per patch.
 */
import { readFileSync } from "node:fs";
import { redefine, RedefineError, restoreAll, transaction } from "../mod.ts";
import { codeBytesInUse, redefineToOriginal } from "../src/internal.ts";
import { PROTECT_FROM, writeCode } from "../src/code_memory.ts";
import type { CodeWrite } from "../src/code_memory.ts";
import { platform } from "../platform/mod.ts";
import { elfFunctions, findLibrary } from "../test/elf_file.ts";
import { assemble, mapCodeFile } from "../test/native.ts";
import { best, report } from "./report.ts";
import type { Row } from "./report.ts";

const { os, runtime } = platform();
const COUNT = 1000;
const rows: Row[] = [];

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

/**
 * µs per patch of `a` and of `b`, each a whole round of COUNT patches: the best of interleaved
 * rounds, after as many untimed (the optimizing compiler takes a path's functions after a few
 * dozen rounds: a path first taken here, as a file's mapping's, read 1.5× its floor in the best of
 * 25 cold rounds). A round takes a few ms: 25 of them take well under a second, and find a quiet
 * moment on a shared 2-core machine (with 9, a run under load gave up to twice the floor: a minor
 * GC or another process in every round).
 */
function perPatch(a: () => void, b: () => void, rounds = 25): [number, number] {
  const as: number[] = [], bs: number[] = [];
  for (let r = 0; r < 2 * rounds; r++) {
    for (const [body, out] of [[a, as], [b, bs]] as const) {
      const start = performance.now();
      body();
      if (r >= rounds) out.push(((performance.now() - start) * 1000) / COUNT);
    }
  }
  return [best(as), best(bs)];
}

// COUNT copies of `mov rax, rdi; ret` padded to 16 bytes, 4 pages' worth, and labs as the
// replacement (within near-jump reach or not, as the process's layout has it): in anonymous
// memory, as generated code is, or in a file's mapping, as a library's code is (a transaction's
// body lays a function of a file's mapping out from what it read there before, without asking the
// map again: src/target.ts, `rememberedSite`).
const body = [0x48, 0x89, 0xf8, 0xc3, ...Array(12).fill(0xcc)];
const pages = Math.ceil((COUNT * 16) / os.pageSize);
function functions(file: boolean): bigint[] {
  const blocks = Array.from({ length: Math.ceil(pages / 2) }, (_, b) => {
    const code = Array.from({ length: Math.min(COUNT - b * (2 * os.pageSize / 16), 2 * os.pageSize / 16) }, () => body).flat();
    const block = assemble(code);
    if (file) mapCodeFile(code, block.base);
    return block;
  });
  return blocks.flatMap((b) => Array.from({ length: 2 * os.pageSize / 16 }, (_, i) => b.address + BigInt(16 * i))).slice(0, COUNT);
}
const addresses = functions(false);
const inFile = functions(true);
const labs = os.symbolAddress("labs");
const signature = { parameters: ["i64"], result: "i64" } as const;
const target = (i: number) => ({ address: addresses[i], size: 16, ...signature });

/**
 * The bare writes of the entry jumps our patches of `at` write (a jmp rel32 where labs is in reach,
 * else to a stub: one aligned 8-byte word either way), and of the original bytes back.
 */
function bareWritesOf(at: readonly bigint[]): { jumps: CodeWrite[]; originals: CodeWrite[]; both: () => void } {
  transaction(() => at.map((address) => redefine({ address, size: 16, ...signature }, labs)));
  const jumps = at.map((address) => ({ address, bytes: runtime.view(address, 8).slice() }));
  restoreAll();
  const originals = at.map((address) => ({ address, bytes: runtime.view(address, 8).slice() }));
  return { jumps, originals, both: () => (writeCode(platform(), jumps), writeCode(platform(), originals)) };
}
const { jumps, originals, both: bareWrites } = bareWritesOf(addresses);

for (const [where, at, bare] of [
  ["in anonymous memory", addresses, bareWrites],
  ["in a file's mapping", inFile, bareWritesOf(inFile).both],
] as const) {
  const [ours, baseline] = perPatch(() => {
    transaction(() => at.map((address) => redefine({ address, size: 16, ...signature }, labs)));
    restoreAll();
  }, bare);
  rows.push({
    name: `1000 native redirects ${where} in one transaction + \`restoreAll()\`, per patch / the bare writes`,
    ours,
    baseline,
    unit: "µs",
    goal: { most: 3 },
  });
}

// The floor under the goal above, both ways a write can go: forced writes (no protection changes;
// one system call per store) against mprotect around the whole batch (a few system calls for 4
// pages, plain stores, but each page briefly writable and executable).
const protecting = { ...platform(), os: { ...platform().os, forceWrite: () => false } };
{
  const [viaForced, viaProtect] = perPatch(() => {
    writeCode(platform(), jumps, { protectFrom: Infinity });
    writeCode(platform(), originals, { protectFrom: Infinity });
  }, () => {
    writeCode(protecting, jumps);
    writeCode(protecting, originals);
  });
  rows.push({
    name: "the bare writes of 1000 entry jumps and back, per patch: forced / between `mprotect` pairs",
    ours: viaForced,
    baseline: viaProtect,
    unit: "µs",
    goal: {},
  });
}

// Where the two ways cross: N entry jumps on one page and back, as one batch each way, µs a batch
// (100 batches each way a round: short, so many rounds for the best of them); and N words of a
// page of libc written with the bytes they hold (the same system calls; an mprotect pair costs
// less on a file's page than on anonymous code). writeCode takes the mprotect way from the
// layer's `Os.protectFrom` stores on a run of pages (Linux: 1, forced writes tear under threads
// running the code), else PROTECT_FROM: the forced side here is timed on purpose.
const libcPage = labs - labs % BigInt(os.pageSize);
const libcWords = Array.from({ length: 8 }, (_, i) => {
  const address = libcPage + BigInt(64 * i);
  return { address, bytes: runtime.view(address, 8).slice() };
});
if (os.forceWrite(jumps[0]!.address, originals[0]!.bytes.subarray(0, 1))) {
  for (const [where, n] of [["one page", 1], ["one page", 2], ["one page", 3], ["one page", 4], ["one page", 8], ["a page of libc", 2], ["a page of libc", 3], ["a page of libc", 4]] as const) {
    const [there, back] = where === "one page" ? [jumps.slice(0, n), originals.slice(0, n)] : [libcWords.slice(0, n), libcWords.slice(0, n)];
    const [viaForced, viaProtect] = perPatch(() => {
      for (let i = 0; i < COUNT / 10; i++) {
        writeCode(platform(), there, { protectFrom: Infinity });
        writeCode(platform(), back, { protectFrom: Infinity });
      }
    }, () => {
      for (let i = 0; i < COUNT / 10; i++) {
        writeCode(protecting, there);
        writeCode(protecting, back);
      }
    }, 25);
    rows.push({
      name: `${n} store${n > 1 ? "s" : ""} on ${where} and back, per batch: forced / one \`mprotect\` pair (the layer takes the pair from ${platform().os.protectFrom ?? PROTECT_FROM})`,
      ours: viaForced * 10 / 2,
      baseline: viaProtect * 10 / 2,
      unit: "µs",
      goal: {},
    });
  }
}

{
  const identity = (x: bigint) => x;
  // Warm-up, untimed: the guard's shared code and the thread probe are made once per process.
  transaction(() => addresses.map((_, i) => redefine(target(i), identity)));
  restoreAll();
  const [ours, baseline] = perPatch(() => {
    transaction(() => addresses.map((_, i) => redefine(target(i), identity)));
    restoreAll();
  }, () => {
    const callbacks = addresses.map(() => runtime.callback(signature, identity));
    bareWrites();
    for (const callback of callbacks) callback.close();
  });
  rows.push({
    name: "1000 JS replacements in one transaction + `restoreAll()`, per patch / bare callbacks + writes",
    ours,
    baseline,
    unit: "µs",
    goal: { most: 10 },
  });
}

/** One transaction against COUNT single patches: µs per patch each way, and the mprotect calls. */
function singleVsTransaction(name: string, apply: (i: number) => { restore(): void }) {
  // Warm-up, untimed: symbol lookups and scans are cached alike for both ways.
  transaction(() => Array.from({ length: COUNT }, (_, i) => apply(i)));
  restoreAll();
  const protects = [0, 0];
  const [single, together] = perPatch(() => {
    protects[0] = countProtects(() => {
      const patches = Array.from({ length: COUNT }, (_, i) => apply(i));
      for (const p of patches.reverse()) p.restore();
    })[1];
  }, () => {
    protects[1] = countProtects(() => {
      transaction(() => Array.from({ length: COUNT }, (_, i) => apply(i)));
      restoreAll();
    })[1];
  }, 3);
  rows.push({
    name: `${name}: 1000 single patches / one transaction, per patch (${protects[0]} / ${protects[1]} mprotect)`,
    ours: single,
    baseline: together,
    unit: "µs",
    // No goal any more: with forced writes neither way changes a protection, so a transaction has
    // no mprotect calls left to save (where the kernel refuses them, it saves all but a few).
    goal: {},
  });
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
const libcTarget = (i: number) => ({ symbol: names[i], library: "libc.so.6", parameters: [], result: "void" }) as const;
singleVsTransaction("1000 libc functions (trampolines)", (i) => redefineToOriginal(libcTarget(i)));
singleVsTransaction("1000 small functions on 4 pages (native redirects)", (i) => redefine(target(i), labs));

// Executable memory per patch: trampolines of libc functions (identity hooks), then JS replacements
// of the small functions (trampoline and guard each; never of libc's, which the runtime calls).
// Slots freed by the rounds above wait a second in quarantine: wait it out, to count only these.
await new Promise((resolve) => setTimeout(resolve, 1100));
for (const [kind, apply] of [
  ["trampolines", (i: number) => redefineToOriginal(libcTarget(i))],
  ["JS replacement (guard + trampoline)", (i: number) => redefine(target(i), (x) => x)],
] as const) {
  const before = codeBytesInUse();
  transaction(() => names.slice(0, 200).map((_, i) => apply(i)));
  const per = (codeBytesInUse() - before) / 200;
  restoreAll();
  await new Promise((resolve) => setTimeout(resolve, 1100));
  rows.push({ name: `executable memory per patch, ${kind}`, ours: per, baseline: null, unit: "B", goal: { most: 64 } });
}

report(rows);
