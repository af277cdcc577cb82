// The test scripts' reading of the runners' output (scripts/counts.mjs): the counts, and the failed
// tests' names that the summary lists (a CI log may keep only its tail, where the summary is).
import { assert, test } from "./harness.ts";
// @ts-ignore: a plain JS module of the scripts, without types
import { bunCounts, denoCounts, nodeCounts } from "../scripts/counts.mjs";

const FIRST = "stress: 200 native redirects on and off";
const SECOND = "another (with parens) fails";

// Shortened from each runner's real output for a file of one passing test and two failing ones.
const DENO = [
  "\x1b[0m\x1b[1m\x1b[37m\x1b[41m ERRORS \x1b[0m",
  `${FIRST} \x1b[0m\x1b[38;5;245m=> ./test/f.test.ts:3:1\x1b[0m`,
  "\x1b[0m\x1b[1m\x1b[37m\x1b[41m FAILURES \x1b[0m",
  "",
  `${FIRST} \x1b[0m\x1b[38;5;245m=> ./test/f.test.ts:3:1\x1b[0m`,
  `${SECOND} \x1b[0m\x1b[38;5;245m=> ./test/f.test.ts:4:1\x1b[0m`,
  "",
  "\x1b[0m\x1b[31mFAILED\x1b[0m | 1 passed | 2 failed \x1b[0m\x1b[38;5;245m(5ms)\x1b[0m",
].join("\n");
const BUN = [
  "test/f.test.ts:",
  "(pass) a passing one",
  `(fail) ${FIRST} [0.41ms]`,
  `(fail) ${SECOND} [1.20ms]`,
  "",
  " 1 pass",
  " 2 fail",
].join("\n");
const NODE = [
  "# Subtest: a passing one",
  "ok 1 - a passing one",
  `# Subtest: ${FIRST}`,
  `not ok 2 - ${FIRST}`,
  `# Subtest: ${SECOND}`,
  `not ok 3 - ${SECOND}`,
  "# tests 3",
  "# pass 1",
  "# fail 2",
  "# cancelled 0",
  "# skipped 0",
].join("\n");

test("counts: each runner's output gives its counts and the failed tests' names", () => {
  for (const [counts, output] of [[denoCounts, DENO], [bunCounts, BUN], [nodeCounts, NODE]] as const) {
    assert.deepEqual(counts({ output, ok: false }), [1, 2, 0, [FIRST, SECOND]]);
  }
});

test("counts: a run that ends without its closing line is one failure, still with the names it printed", () => {
  const cut = (output: string) => output.slice(0, output.lastIndexOf(SECOND) + SECOND.length);
  assert.deepEqual(bunCounts({ output: cut(BUN), ok: false }), [0, 1, 0, [FIRST, SECOND]]);
  assert.deepEqual(nodeCounts({ output: cut(NODE), ok: false }), [0, 1, 0, [FIRST, SECOND]]);
  assert.deepEqual(denoCounts({ output: "", ok: false }), [0, 1, 0, []]);
});
