/**
 * Start-up: a whole process that imports redefine as the package's users get it, makes its first
 * patch (a native redirect) and restores it (bench/startup/first_patch.mjs, on Deno
 * first_patch_deno.mjs), against a process running an empty script (bench/startup/empty.mjs), on
 * the runtime running this file. Bun's and Node's users load the package's dist/mod.js, Deno's
 * dist/deno.js (npm's export conditions and JSR's "."), each of which loads this OS's and CPU's
 * one bundle (scripts/build.mjs, run here first: dist/ is not in git), on Linux precompiled for
 * Bun and for Node (Node run without source maps, as here). Runs alternate, so drift hits both alike; each figure is the
 * best run. Wall time is what a user waits; CPU time (user + system, from
 * `getrusage(RUSAGE_CHILDREN)` around each run) is what the process did, and shifts less when the
 * machine is busy.
 */
import { spawnSync } from "node:child_process";
import process from "node:process";
import { platform } from "../platform/mod.ts";
import { best, report } from "./report.ts";

const { runtime } = platform();
const RUNS = 15;
const RUSAGE_CHILDREN = -1;
const libc = runtime.open("libc.so.6", { getrusage: { parameters: ["i32", "buffer"], result: "i32" } });
const usage = new Uint8Array(144);
const fields = new DataView(usage.buffer);

/** CPU seconds of every child waited for so far, in ms: struct rusage starts with ru_utime, ru_stime. */
function childrenCpu(): number {
  if (libc.getrusage(RUSAGE_CHILDREN, usage) !== 0) throw new Error("getrusage failed");
  const timeval = (at: number) => Number(fields.getBigInt64(at, true)) * 1e3 + Number(fields.getBigInt64(at + 8, true)) / 1e3;
  return timeval(0) + timeval(16);
}

const self = (globalThis as { Deno?: { execPath(): string } }).Deno?.execPath() ?? process.execPath;
const args = { deno: ["run", "-A", "--no-check"], bun: ["run"], node: ["--no-warnings"] }[runtime.name];
const root = new URL("..", import.meta.url).pathname;
// By Node 26 from npm, which the build script is written for, whichever runtime runs this file.
if (spawnSync(`${root}node_modules/.bin/node`, ["scripts/build.mjs"], { cwd: root, stdio: "inherit" }).status !== 0) {
  throw new Error("scripts/build.mjs failed");
}

/** Wall and CPU ms of one process running `script`. */
function run(script: string): [number, number] {
  const cpu = childrenCpu();
  const start = performance.now();
  const result = spawnSync(self, [...args, `bench/startup/${script}`], { cwd: root, stdio: "inherit" });
  const wall = performance.now() - start;
  if (result.status !== 0) throw new Error(`${script} exited with ${result.status ?? result.signal}`);
  return [wall, childrenCpu() - cpu];
}

const subject = runtime.name === "deno" ? "first_patch_deno.mjs" : "first_patch.mjs";
run(subject);
run("empty.mjs");
const ours: [number, number][] = [], empty: [number, number][] = [];
for (let r = 0; r < RUNS; r++) {
  ours.push(run(subject));
  empty.push(run("empty.mjs"));
}
const at = (runs: [number, number][], k: 0 | 1) => best(runs.map((r) => r[k]));
report(([[0, "wall"], [1, "CPU"]] as const).map(([k, what]) => ({
  name: `start-up, ${what}: import of the package (dist/mod.js; Deno dist/deno.js) + first redefine + restore / an empty script`,
  ours: at(ours, k),
  baseline: at(empty, k),
  unit: "ms",
  goal: { delta: 10 },
})));
