/**
 * A process's first patch sets up only what it uses; what it leaves is set up by the first patch
 * that needs it (test/fixtures/first_patch.ts, each case in a fresh process).
 */
import { assert, test } from "./harness.ts";
import { runCase } from "./cases.ts";

const fixture = new URL("./fixtures/first_patch.ts", import.meta.url);

test("first patch: a JS replacement made after a native first patch knows the JS thread", () => {
  assert.deepEqual(runCase(fixture, "a guard after a native first patch"), { fromJs: 4242, otherThreadGetsOriginal: true });
});
