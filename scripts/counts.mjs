// Reading the test runners' closing lines, for the scripts that add them up. Each returns
// [passed, failed, skipped, names]: names are the failed tests' names, for the summary, which is
// all a CI log's tail may show.

/**
 * The names of the failed tests in a runner's output: Bun's "(fail) name [time]", TAP's "not ok N -
 * name" (Node), Deno's "name => file:line:column" under its FAILURES heading.
 */
export function failedNames(colored) {
  // deno test colours its output even into a pipe.
  const output = colored.replace(/\x1b\[[\d;]*m/g, "");
  const names = [];
  for (const m of output.matchAll(/^\(fail\) (.+?)(?: \[[\d.]+m?s\])?$/gm)) names.push(m[1]);
  for (const m of output.matchAll(/^\s*not ok \d+ - (.+?)(?: # .*)?$/gm)) names.push(m[1]);
  const deno = output.lastIndexOf(" FAILURES ");
  if (deno >= 0) {
    for (const m of output.slice(deno).matchAll(/^(.+?) => \S+:\d+:\d+$/gm)) names.push(m[1]);
  }
  return [...new Set(names)];
}

/**
 * [passed, failed, skipped] from `deno test`'s closing line (skipped: its "ignored"); a crash or a
 * missing line is one failure.
 */
export function denoCounts({ output, ok }) {
  const m = /(\d+) passed(?: \(\d+ steps?\))? \| (\d+) failed(?: \(\d+ steps?\))?(?: \| (\d+) ignored)?/.exec(output);
  if (!m) return [0, 1, 0, failedNames(output)];
  return [Number(m[1]), Number(m[2]) + (ok || Number(m[2]) ? 0 : 1), Number(m[3] ?? 0), failedNames(output)];
}

/** [passed, failed, skipped] from `bun test`'s closing lines; a crash or a missing line is one failure. */
export function bunCounts({ output, ok }) {
  const count = (word) => Number(new RegExp(`^\\s*(\\d+) ${word}$`, "m").exec(output)?.[1] ?? 0);
  if (!/^\s*\d+ pass$/m.test(output)) return [0, 1, 0, failedNames(output)];
  const failed = count("fail");
  return [count("pass"), failed + (ok || failed ? 0 : 1), count("skip"), failedNames(output)];
}

/**
 * [passed, failed, skipped] from `node --test --test-reporter=tap`'s closing lines (`# pass N`,
 * `# fail N`, `# cancelled N`, `# skipped N`); a crash or a missing line is one failure.
 */
export function nodeCounts({ output, ok }) {
  const count = (name) => Number(new RegExp(`^# ${name} (\\d+)$`, "m").exec(output)?.[1] ?? 0);
  if (!/^# pass \d+$/m.test(output)) return [0, 1, 0, failedNames(output)];
  // Node reports a file that registers no test (windows_e2e off Windows) as one passing test,
  // named by its path; Deno and Bun count none there.
  const empty = output.match(/^ok \d+ - \S+\.test\.ts$/gm)?.length ?? 0;
  // A cancelled test (timed out, or its file failed to load) has failed.
  const failed = count("fail") + count("cancelled");
  return [count("pass") - empty, failed + (ok || failed ? 0 : 1), count("skipped"), failedNames(output)];
}
