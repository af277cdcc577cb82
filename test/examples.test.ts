import { assert, runtimeName, runtimePath, test } from "./harness.ts";
import { execFileSync } from "node:child_process";
import { platform } from "../platform/mod.ts";

/** Runs an example the way its header says, with the runtime running the tests. */
function run(example: string): string {
  const file = new URL(`../examples/${example}`, import.meta.url).pathname;
  const bin = runtimePath;
  return execFileSync(bin, runtimeName === "deno" ? ["run", "--allow-ffi", file] : [file], { encoding: "utf8" });
}

test("example hex_atoi: atoi reads hex while strtol is redefined, decimal after", () => {
  const out = run("hex_atoi.ts");
  assert.match(out, /libc as shipped: +atoi\("10"\) = 10, atoi\("ff"\) = 0/);
  assert.match(out, /strtol redefined \(hex\): +atoi\("10"\) = 16, atoi\("ff"\) = 255, atoi\("7fff"\) = 32767/);
  assert.match(out, /restored: +atoi\("10"\) = 10/);
});

test("example trace_strtol: every strtol call atoi makes is logged, answers unchanged", () => {
  const out = run("trace_strtol.ts");
  assert.match(out, /atoi summed to 40; libc called strtol 3 times/);
  assert.match(out, /strtol\("-2", NULL, 10\) = -2/);
});

test("example mock_getuid: the JS thread sees the mock, the original the truth", () => {
  const out = run("mock_getuid.ts");
  const real = /real: (\d+)/.exec(out)![1];
  const fake = real === "0" ? "1000" : "0";
  assert.match(out, new RegExp(`mocked: getuid\\(\\) = ${fake}; the original says ${real}`));
  assert.match(out, new RegExp(`restored: getuid\\(\\) = ${real}`));
});

test("example memoize: libm's jn answered from a cache, asked once per question", () => {
  const out = run("memoize.ts");
  assert.match(out, /jn memoized: 1200 calls, 1080 answered from the cache \(90\.0% hit rate\), 120 reached libm/);
  assert.match(out, /every answer equals libm's own/);
  assert.match(out, /restored: jn is libm's again \(the cache saw 0 more calls\)/);
});

test("example canned: returns() reaches a native thread and counts; sequence() deals its values, the last repeating", () => {
  const out = run("canned.ts");
  assert.match(out, /returns\(42\): getppid\(\) = 42; on a native thread: 42/);
  assert.match(out, /calls counted natively: 2/);
  assert.match(out, /restored: getppid\(\) is the real parent again: true/);
  assert.match(out, /rand\(\) = 4, 8, 15, 16, 23, 42, 42, 42 \(the last repeats\); calls = 8/);
});

const sqlite = (() => {
  try {
    platform().runtime.open("libsqlite3.so.0", { sqlite3_libversion_number: { parameters: [], result: "i32" } });
    return true;
  } catch {
    return false;
  }
})();

test("example fake_clock_sqlite: sqlite's 'now' frozen, then a day later, while Date.now() runs on; real after restore", () => {
  const out = run("fake_clock_sqlite.ts");
  const real = /real: +sqlite datetime\('now'\) = \S+ \S+, strftime\('%s','now'\) = (\d+); Date.now\(\) 20[2-9]/.exec(out)!;
  assert.match(out, /frozen: +sqlite datetime\('now'\) = 2001-09-09 01:46:40, strftime\('%s','now'\) = 1000000000; Date.now\(\) 20[2-9]/);
  assert.match(out, /\+1 day: +sqlite datetime\('now'\) = 2001-09-10 01:46:40, strftime\('%s','now'\) = 1000086400; Date.now\(\) 20[2-9]/);
  const restored = /restored: +sqlite datetime\('now'\) = \S+ \S+, strftime\('%s','now'\) = (\d+)/.exec(out)!;
  assert.ok(Number(restored[1]) - Number(real[1]) < 60, `real again: ${restored[1]} after ${real[1]}`);
}, { skip: sqlite ? undefined : "libsqlite3.so.0 is not installed" });
