/**
 * A process's first patch sets up only what it uses; what it leaves is set up by the first patch
 * that needs it (test/fixtures/first_patch.ts, each case in a fresh process).
 */
import process from "node:process";
import { assert, runtimeName, test } from "./harness.ts";
import { runCase } from "./cases.ts";
import { cstr, isArm64, os, runtime } from "./native.ts";
import { exclusive } from "../src/registry.ts";

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

test("registry: what the OS layer put off runs once, as the outermost section ends, after the lock is given back", () => {
  // The lock is the process-wide store's first word; the store's address is published in the
  // environment (src/shared_registry.ts: layout 1).
  exclusive(() => {});
  const { getenv } = runtime.open("libc.so.6", { getenv: { parameters: ["buffer"], result: "pointer" } });
  const published = BigInt(getenv!(cstr(`REDEFINE_REGISTRY_1_${process.pid}`)) as bigint | number);
  assert.notEqual(published, 0n, "the store's address is in the environment");
  const lockWord = runtime.view(BigInt(runtime.cString(published)), 8);
  const held = () => lockWord.some((byte) => byte !== 0);
  const runs: boolean[] = [];
  const { runDeferred } = os;
  os.runDeferred = () => void runs.push(held());
  try {
    exclusive(() => {
      exclusive(() => assert.ok(held(), "held inside a nested section"));
      exclusive(() => {});
      assert.deepEqual(runs, [], "not at a nested section's end");
    });
    assert.deepEqual(runs, [false], "once, at the outermost section's end, the lock given back");
    assert.throws(() => exclusive(() => exclusive(() => {
      throw new Error("from the body");
    })), /from the body/);
    assert.deepEqual(runs, [false, false], "also when the body throws, which stays the section's outcome");
  } finally {
    os.runDeferred = runDeferred;
  }
}, { skip: runtime.os === "linux" ? undefined : "Linux: the store's address is published with setenv" });
