// Runs every check of `npm test` and closes with one line: "N passed, N failed, N skipped".
// Each test suite counts its tests; each whole-program check (types, docs, publish) counts as one.
import { spawnSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { bunCounts, denoCounts, nodeCounts } from "./counts.mjs";

const bin = (name) => new URL(`../node_modules/.bin/${name}`, import.meta.url).pathname;
const root = new URL("..", import.meta.url).pathname;
const only = process.argv.slice(2);

function run(command, args) {
  const result = spawnSync(command, args, { cwd: root, encoding: "utf8", env: { ...process.env, NO_COLOR: "1" } });
  const output = (result.stdout ?? "") + (result.stderr ?? "");
  process.stdout.write(output);
  return { output, ok: result.status === 0 };
}

const steps = [
  ["deno test", () => {
    return denoCounts(run(bin("deno"), ["test", "-A", "--no-check", "test/"]));
  }],
  ["bun test", () => {
    return bunCounts(run(bin("bun"), ["test", "./test/"]));
  }],
  ["node test", () => {
    // Node 26 from npm (it has node:ffi), by its path: a bare `node` may be another Node.
    return nodeCounts(run(bin("node"), ["--test", "--test-reporter=tap", "test/*.test.ts"]));
  }],
  ["deno check", () => one(run(bin("deno"), ["check", "mod.ts", "test/", "examples/", "bench/"]))],
  ["tsc (bun-types)", () => {
    // Deno's own declarations let tsc check the Deno adapter beside the Bun one.
    mkdirSync(new URL("../.cache", import.meta.url), { recursive: true });
    const types = spawnSync(bin("deno"), ["types"], { encoding: "utf8" });
    writeFileSync(new URL("../.cache/lib.deno.d.ts", import.meta.url), types.stdout);
    return one(run(bin("tsc"), ["-p", "tsconfig.bun.json"]));
  }],
  ["deno doc --lint", () => one(run(bin("deno"), ["doc", "--lint", "mod.ts"]))],
  ["deno publish --dry-run", () => one(run(bin("deno"), ["publish", "--dry-run", "--allow-dirty"]))],
];

function one({ ok }) {
  return ok ? [1, 0] : [0, 1];
}

let passed = 0, failed = 0, skipped = 0;
const summary = [];
for (const [name, step] of steps) {
  if (only.length && !only.includes(name)) continue;
  console.log(`\n=== ${name}`);
  const [p, f, s = 0] = step();
  passed += p;
  failed += f;
  skipped += s;
  summary.push(`${f ? "FAIL" : "ok  "} ${name}: ${p} passed, ${f} failed, ${s} skipped`);
}
console.log("\n" + summary.join("\n"));
console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`);
process.exit(failed ? 1 : 0);
