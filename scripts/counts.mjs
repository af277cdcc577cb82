// Reading the test runners' closing lines, for the scripts that add them up.

/** [passed, failed] from `deno test`'s closing line; a crash or a missing line is one failure. */
export function denoCounts({ output, ok }) {
  const m = /(\d+) passed(?: \(\d+ steps?\))? \| (\d+) failed/.exec(output);
  return m ? [Number(m[1]), Number(m[2]) + (ok || Number(m[2]) ? 0 : 1)] : [0, 1];
}

/** [passed, failed] from `bun test`'s closing lines; a crash or a missing line is one failure. */
export function bunCounts({ output, ok }) {
  const pass = /^\s*(\d+) pass/m.exec(output), fail = /^\s*(\d+) fail/m.exec(output);
  if (!pass) return [0, 1];
  const failed = fail ? Number(fail[1]) : 0;
  return [Number(pass[1]), failed + (ok || failed ? 0 : 1)];
}
