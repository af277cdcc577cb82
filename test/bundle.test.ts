// The bundle every runtime's users load (dist/, built by scripts/build.mjs: npm test's first step,
// and test:windows's and test:arm64's own), on this system for real: under Wine and qemu-user too,
// where test/package.test.ts's tarball installs do not run. In a child process, as a user's program.
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { assert, fixtureJson, runtimeName, runtimePath, test } from "./harness.ts";

// Paths, not URLs' pathnames: Windows has drive letters.
const dist = fileURLToPath(new URL("../dist/mod.js", import.meta.url));

/** Runs test/fixtures/`name` under this runtime as a user's program; the last line of JSON it printed. */
function run(name: string) {
  const seen = fixtureJson(new URL(`./fixtures/${name}`, import.meta.url));
  return { ...seen, why: JSON.stringify(seen) };
}

/** What test/fixtures/bundle.ts saw of the bundle it loaded: a native redefine, its restore, its error. */
function assertRedefinedAndNamed(seen: ReturnType<typeof run>): void {
  const { why } = seen;
  assert.ok(seen.entry.endsWith(runtimeName === "deno" ? "/dist/deno.js" : "/dist/mod.js"), why);
  assert.notEqual(seen.real, seen.answer, why);
  assert.equal(seen.patched, seen.answer, "patched, the process-id function answers the other one's value");
  assert.equal(seen.restored, seen.real, "restored, it answers the process id again");
  assert.equal(seen.refused?.code, "SYMBOL_NOT_FOUND", why);
  assert.equal(seen.refused.name, "RedefineError", "the bundle keeps the error class's name");
  assert.ok(seen.refused.ours, "the error is the bundle's own RedefineError");
}

/** A stack frame in the TypeScript sources shipped beside dist/. */
const IN_SOURCES = /[/\\](src|platform)[/\\][\w/\\]+\.ts:\d+:\d+/;

/**
 * Where scripts/build.mjs precompiles this system's bundle for Bun and Node (`precompile`: the
 * build machine's own system, Linux), which dist/mod.js then loads on each.
 */
const precompiled = runtimeName !== "deno" && process.platform === "linux" && process.arch === "x64";

test("bundle: this system's bundle in dist/ redefines its process-id function natively, restores it, and names its errors", () => {
  assert.ok(existsSync(dist), `${dist} is missing: build it with 'node scripts/build.mjs' (npm test does first)`);
  const seen = run("bundle.ts"), { why } = seen;
  assertRedefinedAndNamed(seen);
  // The bundle's source map leads a stack frame into the TypeScript sources shipped beside it;
  // Bun's precompiled bundle's map leads there through it.
  assert.match(seen.refused.top, IN_SOURCES, why);
  // Bun loads the bundle compiled to bytecode (dist/linux-x64.bun.cjs and its .jsc) and not the
  // module; Node, mapping stack traces through source maps here, the module.
  if (precompiled && runtimeName === "bun") assert.deepEqual(seen.loaded.toSorted(), ["linux-x64.bun.cjs", "mod.js"], why);
});

// A bundler that takes Bun's bytecode file for plain CommonJS (it drops the wrapper Bun's loader
// reads the file by) finds no function in it: dist/mod.js then runs the module, which it has too.
if (precompiled && runtimeName === "bun") {
  test("bundle: bun build --compile of a program importing dist/mod.js makes an executable that redefines and restores", () => {
    const dir = mkdtempSync(join(tmpdir(), "redefine-compile-"));
    try {
      const program = join(dir, "program.ts");
      writeFileSync(program, `import { redefine } from ${JSON.stringify(dist)};
const patch = redefine({ symbol: "getpid", parameters: [], result: "i32" }, { symbol: "getppid" });
patch.restore();
console.log(JSON.stringify({ restored: true }));
`);
      const build = spawnSync(runtimePath, ["build", "--compile", program, "--outfile", join(dir, "program")], { encoding: "utf8" });
      assert.equal(build.status, 0, `${build.stdout}\n${build.stderr}`);
      const child = spawnSync(join(dir, "program"), [], { encoding: "utf8" });
      assert.equal(child.status, 0, `status ${child.status}, signal ${child.signal}\n${child.stdout}\n${child.stderr.slice(-2000)}`);
      assert.equal(child.stdout.trim(), JSON.stringify({ restored: true }));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}

// Node without source maps (its default) runs this system's bundle as a script with the code cache
// the build made, which Node maps no stack trace of: the test above sees the module.
if (precompiled && runtimeName === "node") {
  test("bundle: Node without source maps runs the bundle as a script with the code cache its V8 takes, and it redefines, restores and names its errors", () => {
    const fixture = fileURLToPath(new URL("./fixtures/bundle.ts", import.meta.url));
    const child = spawnSync(runtimePath, ["--no-warnings", fixture], { encoding: "utf8" });
    const line = child.stdout.split("\n").filter((l) => l.startsWith("{")).at(-1);
    assert.equal(child.status, 0, `status ${child.status}, signal ${child.signal}\n${child.stdout}\n${child.stderr.slice(-2000)}`);
    const seen = { ...JSON.parse(line!), why: line! }, { why } = seen;
    assertRedefinedAndNamed(seen);
    assert.equal(seen.sourceMaps, false, why);
    assert.match(seen.refused.top, /[/\\]dist[/\\]linux-x64\.script\.js:\d+:\d+/, "the script ran, not the module");
    assert.equal(seen.cacheTaken, true, "this Node takes the code cache the build made (by npm's node: run the tests with the Node that built dist/)");
  });
}

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

