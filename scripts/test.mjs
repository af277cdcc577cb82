// Runs every check of `npm test` and closes with one line: "N passed, N failed, N skipped".
// Each test suite counts its tests; each whole-program check (types, docs, publish) counts as one.
import { writeDenoTypes } from "./build.mjs";
import { bunCounts, denoCounts, nodeCounts } from "./counts.mjs";
import { echoed, report, runSteps } from "./steps.mjs";

const bin = (name) => new URL(`../node_modules/.bin/${name}`, import.meta.url).pathname;
const root = new URL("..", import.meta.url).pathname;
const only = process.argv.slice(2);

function run(command, args) {
  return echoed(command, args, { cwd: root, env: { ...process.env, NO_COLOR: "1" } });
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
  // src/ and platform/ import each other one way only (see ARCHITECTURE.md).
  ["import circles", () => one(run(process.execPath, ["scripts/import_cycles.mjs"]))],
  ["deno check", () => one(run(bin("deno"), ["check", "mod.ts", "test/", "examples/", "bench/"]))],
  ["tsc (bun-types)", () => {
    // Deno's own declarations let tsc check the Deno adapter beside the Bun one.
    writeDenoTypes();
    return one(run(bin("tsc"), ["-p", "tsconfig.bun.json"]));
  }],
  ["deno doc --lint", () => one(run(bin("deno"), ["doc", "--lint", "mod.ts"]))],
  ["deno publish --dry-run", () => one(run(bin("deno"), ["publish", "--dry-run", "--allow-dirty"]))],
];

function one({ ok }) {
  return ok ? [1, 0] : [0, 1];
}

process.exit(report(runSteps(steps, { only })));
