/**
 * A process's first patch sets up only what it uses; what it leaves is set up by the first patch
 * that needs it (test/fixtures/first_patch.ts, each case in a fresh process).
 */
import { assert, runtimeName, test } from "./harness.ts";
import { runCase } from "./cases.ts";
import { isArm64 } from "./native.ts";

const fixture = new URL("./fixtures/first_patch.ts", import.meta.url);

test("first patch: a JS replacement made after a native first patch knows the JS thread", () => {
  assert.deepEqual(runCase(fixture, "a guard after a native first patch"), { fromJs: 4242, otherThreadGetsOriginal: true });
});

test("first patch: a busy-later symbol is bound after the section that proved it busy, never between a patch's stores", () => {
  // N lone patches and restores shift which forced write is the process's 16th, the one that
  // proves pwrite busy: over N = 0..8 it falls on each store of dlsym's patch and restore
  // (three each, two stores apart per N), the tail and head ones included.
  const busy = new URL("./fixtures/busy_later.ts", import.meta.url);
  const during: number[] = [];
  for (let n = 0; n <= 8; n++) {
    const seen = runCase(busy, `toggles ${n}`) as { midWrite: number; bound: string[]; failed: string | null; form: number; restored: boolean };
    assert.equal(seen.form, 14, "dlsym's entry jump is the 14-byte one, three stores");
    assert.equal(seen.failed, null);
    assert.equal(seen.midWrite, 0, `after ${n} toggles: a binding ran while dlsym's entry jumped to itself`);
    assert.equal(seen.restored, true);
    if (seen.bound.includes("pwrite")) during.push(n);
  }
  assert.ok(during.length > 0, "pwrite proved busy during dlsym's patch or restore for some N: the scan reached it");
}, { skip: runtimeName === "deno" && !isArm64 ? undefined : "Deno on x86-64 only: there pwrite is called through its address until busy, by forced writes" });
