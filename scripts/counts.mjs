// Reading the test runners' closing lines, for the scripts that add them up.

/**
 * [passed, failed, skipped] from `deno test`'s closing line (skipped: its "ignored"); a crash or a
 * missing line is one failure.
 */
export function denoCounts({ output, ok }) {
  const m = /(\d+) passed(?: \(\d+ steps?\))? \| (\d+) failed(?: \(\d+ steps?\))?(?: \| (\d+) ignored)?/.exec(output);
  if (!m) return [0, 1, 0];
  return [Number(m[1]), Number(m[2]) + (ok || Number(m[2]) ? 0 : 1), Number(m[3] ?? 0)];
}

/** [passed, failed, skipped] from `bun test`'s closing lines; a crash or a missing line is one failure. */
export function bunCounts({ output, ok }) {
  const count = (word) => Number(new RegExp(`^\\s*(\\d+) ${word}$`, "m").exec(output)?.[1] ?? 0);
  if (!/^\s*\d+ pass$/m.test(output)) return [0, 1, 0];
  const failed = count("fail");
  return [count("pass"), failed + (ok || failed ? 0 : 1), count("skip")];
}
