// The bundle every runtime's users load (dist/, built by scripts/build.mjs: npm test's first step,
// and test:windows's and test:arm64's own), on this system for real: under Wine and qemu-user too,
// where test/package.test.ts's tarball installs do not run. In a child process, as a user's program.
import { existsSync } from "node:fs";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { assert, fixtureJson, runtimeName, test } from "./harness.ts";

// Paths, not URLs' pathnames: Windows has drive letters.
const dist = fileURLToPath(new URL("../dist/mod.js", import.meta.url));

/** Runs test/fixtures/`name` under this runtime as a user's program; the last line of JSON it printed. */
function run(name: string) {
  const seen = fixtureJson(new URL(`./fixtures/${name}`, import.meta.url));
  return { ...seen, why: JSON.stringify(seen) };
}

test("bundle: this system's bundle in dist/ redefines its process-id function natively, restores it, and names its errors", () => {
  assert.ok(existsSync(dist), `${dist} is missing: build it with 'node scripts/build.mjs' (npm test does first)`);
  const seen = run("bundle.ts"), { why } = seen;
  assert.ok(seen.entry.endsWith(runtimeName === "deno" ? "/dist/deno.js" : "/dist/mod.js"), why);
  assert.notEqual(seen.real, seen.answer, why);
  assert.equal(seen.patched, seen.answer, "patched, the process-id function answers the other one's value");
  assert.equal(seen.restored, seen.real, "restored, it answers the process id again");
  assert.equal(seen.refused?.code, "SYMBOL_NOT_FOUND", why);
  assert.equal(seen.refused.name, "RedefineError", "the bundle keeps the error class's name");
  assert.ok(seen.refused.ours, "the error is the bundle's own RedefineError");
  // The bundle's source map leads a stack frame into the TypeScript sources shipped beside it.
  assert.match(seen.refused.top, /[/\\](src|platform)[/\\][\w/\\]+\.ts:\d+:\d+/, why);
});

// The trace command runs the sources; a traced script importing the package loads the bundle.
if (process.platform !== "win32") {
  test("bundle: the sources and the bundle in one isolate see each other's patches as another isolate's, each restoring its own", () => {
    const seen = run("two_copies.ts"), { uid, pid, parent } = seen;
    assert.equal(seen.distinctClasses, true, "each copy has its own RedefineError class");
    assert.equal(seen.depth, 1, "the bundle's patch layers on the sources'");
    assert.equal(seen.stacked, 9, "the upper layer answers");
    assert.equal(seen.belowSteps, null, "a guarded patch under the other copy's steps aside");
    assert.equal(seen.afterBelow, 9);
    assert.equal(seen.uidBack, true, "restoring the top puts getuid's own bytes back");
    assert.equal(seen.onNative, 5);
    assert.deepEqual(seen.nativeUnder, { code: "OUT_OF_ORDER", sources: true, bundle: false }, "a native patch under the other copy's");
    assert.equal(seen.nativeAlone, parent);
    assert.equal(seen.nativeAfter, null);
    assert.equal(seen.pidBack, true);
    assert.deepEqual(seen.restoreAll, { uid: 11, pid, kept: true }, "the bundle's restoreAll() restores its own, not the sources'");
    assert.equal(seen.allBack, true);
    assert.notEqual(uid, 11);
  });
}
