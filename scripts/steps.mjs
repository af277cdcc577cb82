// What the test scripts (test, test:arm64, test:windows) share: running a command, installing
// Debian packages, and running named steps that each count their tests, closed by one summary line.
import { spawnSync } from "node:child_process";

/** Runs `command` synchronously, its output as text. */
export function sh(command, args, options = {}) {
  return spawnSync(command, args, { encoding: "utf8", maxBuffer: 256 * 1024 * 1024, ...options });
}

/** Runs `command`, echoes its output and returns it with whether it exited 0, for `counts.mjs`. */
export function echoed(command, args, options = {}) {
  const result = sh(command, args, options);
  const output = (result.stdout ?? "") + (result.stderr ?? "");
  process.stdout.write(output);
  if (result.error) console.log(`\n${result.error.message}`);
  return { output, ok: result.status === 0 };
}

/**
 * The step that builds dist/ (scripts/build.mjs; not in git), which the package's exports, the doc
 * examples' bare imports, the package test and test/bundle.test.ts load: first in every test script,
 * run even where only other steps are asked for.
 */
export const buildDist = ["build dist", () => {
  const build = new URL("./build.mjs", import.meta.url).pathname;
  return echoed(process.execPath, [build], { cwd: new URL("..", import.meta.url).pathname }).ok ? [1, 0] : [0, 1];
}];

/** Installs the Debian packages of `names` not installed yet; throws when apt cannot. */
export function aptInstall(names) {
  const listed = sh("dpkg-query", ["-W", "-f", "${Package} ${db:Status-Status}\n", ...names]).stdout ?? "";
  const installed = new Set(listed.split("\n").filter((l) => l.endsWith(" installed")).map((l) => l.split(" ")[0]));
  const missing = names.filter((name) => !installed.has(name));
  if (!missing.length) return;
  const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
  const install = () =>
    sh("apt-get", ["install", "-y", "-qq", "--no-install-recommends", ...missing], { env, stdio: "inherit" });
  // Package lists may be missing or stale on a fresh machine: refresh them only when needed.
  if (install().status === 0) return;
  console.log("apt-get install failed; updating the package lists and trying again");
  if (sh("apt-get", ["update", "-qq"], { env, stdio: "inherit" }).status !== 0) throw new Error("apt-get update failed");
  if (install().status !== 0) throw new Error(`apt-get install ${missing.join(" ")} failed`);
}

/** The running totals of `runSteps`: tests passed, failed and skipped, and one summary line per step. */
export function totals() {
  return { passed: 0, failed: 0, skipped: 0, lines: [] };
}

/** How many failed tests a summary names under its step. */
const MAX_NAMES = 12;

/**
 * Runs each `[name, step]` of `steps` whose name is in `only` (every one when `only` is empty;
 * `buildDist` always); a step returns `[passed, failed, skipped, names]` (skipped: the tests that
 * report an optional system tool or library missing; names: the failed tests', optional). Adds
 * them to `into`, with a summary line titled `label name` and a line for each failed test's name.
 */
export function runSteps(steps, { only = [], label = "", into = totals() } = {}) {
  for (const [name, step] of steps) {
    // dist/ is built whichever steps are asked for: the rest load it.
    if (only.length && !only.includes(name) && step !== buildDist[1]) continue;
    const title = label ? `${label} ${name}` : name;
    console.log(`\n=== ${title}`);
    const started = Date.now();
    const [passed, failed, skipped = 0, names = []] = step();
    into.passed += passed;
    into.failed += failed;
    into.skipped += skipped;
    const seconds = ((Date.now() - started) / 1000).toFixed(0);
    into.lines.push(`${failed ? "FAIL" : "ok  "} ${title}: ${counted(passed, failed, skipped)} (${seconds} s)`);
    // The failed tests by name, under their step: a CI log may keep only its last lines.
    for (const name of names.slice(0, MAX_NAMES)) into.lines.push(`       failed: ${name}`);
    if (names.length > MAX_NAMES) into.lines.push(`       failed: and ${names.length - MAX_NAMES} more`);
  }
  return into;
}

function counted(passed, failed, skipped) {
  return `${passed} passed, ${failed} failed, ${skipped} skipped`;
}

/** Prints the summary and the closing line "N passed, N failed, N skipped"; the exit code to end with. */
export function report({ passed, failed, skipped, lines }) {
  console.log("\n" + lines.join("\n"));
  console.log(counted(passed, failed, skipped));
  return failed ? 1 : 0;
}
