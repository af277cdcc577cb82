// Runs every check of `npm test` and closes with one line: "N passed, N failed".
// Each test suite counts its tests; each whole-program check (types, docs, publish) counts as one.
import { spawnSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";

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
    const { output, ok } = run(bin("deno"), ["test", "-A", "--no-check", "test/"]);
    const m = /(\d+) passed(?: \(\d+ steps?\))? \| (\d+) failed/.exec(output);
    return m ? [Number(m[1]), Number(m[2]) + (ok || Number(m[2]) ? 0 : 1)] : [0, 1];
  }],
  ["bun test", () => {
    const { output, ok } = run(bin("bun"), ["test", "./test/"]);
    const pass = /^\s*(\d+) pass/m.exec(output), fail = /^\s*(\d+) fail/m.exec(output);
    if (!pass) return [0, 1];
    const failed = fail ? Number(fail[1]) : 0;
    return [Number(pass[1]), failed + (ok || failed ? 0 : 1)];
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

let passed = 0, failed = 0;
const summary = [];
for (const [name, step] of steps) {
  if (only.length && !only.includes(name)) continue;
  console.log(`\n=== ${name}`);
  const [p, f] = step();
  passed += p;
  failed += f;
  summary.push(`${f ? "FAIL" : "ok  "} ${name}: ${p} passed, ${f} failed`);
}
console.log("\n" + summary.join("\n"));
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
