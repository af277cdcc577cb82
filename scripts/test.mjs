// Runs every check of `npm test` and closes with one line: "N passed, N failed, N skipped".
// Each test suite counts its tests; each whole-program check (types, docs, publish) counts as one.
import { writeDenoTypes } from "./build.mjs";
import { bunCounts, denoCounts, nodeCounts } from "./counts.mjs";
import { buildDist, echoed, report, runSteps } from "./steps.mjs";

const bin = (name) => new URL(`../node_modules/.bin/${name}`, import.meta.url).pathname;
const root = new URL("..", import.meta.url).pathname;
const only = process.argv.slice(2);

function run(command, args) {
  return echoed(command, args, { cwd: root, env: { ...process.env, NO_COLOR: "1" } });
}

const steps = [
  buildDist,
  ["deno test", () => {
    return denoCounts(run(bin("deno"), ["test", "-A", "--no-check", "test/"]));
  }],
  ["bun test", () => {
    return bunCounts(run(bin("bun"), ["test", "./test/"]));
  }],
  ["node test", () => {
    // Node 26 from npm (it has node:ffi), by its path: a bare `node` may be another Node. Hot
    // functions are optimized on the JS thread (the flag reaches each file's process): Node
    // 26.10 frees node:ffi's functions while its environment ends, and an optimizing job still
    // reading one's fast-call signature on a background thread crashed (SIGSEGV in
    // FastApiCallOp::inputs_rep; probe.test.ts, which ends in a hot loop of FFI calls, 3 of 328
    // runs under load, 0 of 600 with the flag). See the README's Node section.
    // One file at a time, as deno test and bun test run them: test/package.test.ts's `npm pack`
    // rebuilds dist/, which test/bundle.test.ts loads (Node's default runs cores − 1 files at once).
    const flags = ["--no-concurrent-recompilation", "--test", "--test-concurrency=1", "--test-reporter=tap"];
    return nodeCounts(run(bin("node"), [...flags, "test/*.test.ts"]));
  }],
  // src/ and platform/ import each other one way only (see ARCHITECTURE.md).
  ["import circles", () => one(run(process.execPath, ["scripts/import_cycles.mjs"]))],
  ["deno check", () => one(run(bin("deno"), ["check", "mod.ts", "test/", "examples/", "bench/"]))],
  ["tsc (bun-types)", () => {
    // Deno's own declarations let tsc check the Deno adapter beside the Bun one.
    writeDenoTypes();
    return one(run(bin("tsc"), ["-p", "tsconfig.bun.json"]));
  }],
  // The sources as a strict consumer's checker sees them, with bun-types and with @types/node.
  ["consumer types", () => one(run(process.execPath, ["scripts/consumer_types.mjs"]))],
  ["deno doc --lint", () => one(run(bin("deno"), ["doc", "--lint", "mod.ts"]))],
  // Every export of mod.ts has an @example (the next step type-checks them).
  ["doc examples", () => one(run(process.execPath, ["scripts/doc_examples.mjs"]))],
  // Every JSDoc example type-checks, importing the package by its name (not run: they patch libc).
  ["deno test --doc", () => one(run(bin("deno"), ["test", "--doc", "--no-run", "mod.ts", "src/", "platform/"]))],
  ["deno publish --dry-run", () => {
    // No warning passes (an unanalyzable dynamic import, a slow type) but one that cannot be
    // avoided nor silenced (denoland/deno#22594): the trace command importing the user's script by
    // its path, which needs no rewriting at publish time.
    const result = run(bin("deno"), ["publish", "--dry-run", "--allow-dirty"]);
    const warnings = [...result.output.matchAll(/^warning\[([\w-]+)\].*\n.*--> (\S+?):\d+:\d+/gm)];
    const unexpected = warnings.filter(([, kind, at]) =>
      !(kind === "unanalyzable-dynamic-import" && at.endsWith("/src/trace/cli.ts"))
    );
    const unparsed = (result.output.match(/^warning\[/gm) ?? []).length !== warnings.length;
    // JSR serves dist/deno.js on every runtime (its npm compatibility layer too), which loads
    // none of the Bun and Node precompiled forms: deno.json leaves them out (dist/mod.js, which
    // would load them first, runs the module where they are missing).
    const files = [...result.output.matchAll(/^\s+file:\/\/\S*?\/(dist\/\S+)/gm)].map(([, file]) => file);
    const precompiled = files.filter((file) => /\.(script\.js|node-cache|bun\.cjs(\.\w+)?)$/.test(file));
    if (precompiled.length) console.error(`deno publish would publish the precompiled forms: ${precompiled.join(", ")}`);
    const published = files.includes("dist/deno.js") && precompiled.length === 0;
    return one({ ok: result.ok && unexpected.length === 0 && !unparsed && published });
  }],
];

function one({ ok }) {
  return ok ? [1, 0] : [0, 1];
}

process.exit(report(runSteps(steps, { only })));
