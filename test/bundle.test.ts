// The bundle every runtime's users load (dist/, built by scripts/build.mjs: npm test's first step,
// and test:windows's and test:arm64's own), on this system for real: under Wine and qemu-user too,
// where test/package.test.ts's tarball installs do not run. In a child process, as a user's program.
import { spawnSync } from "node:child_process";
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, sep } from "node:path";
import process from "node:process";
import { fileURLToPath, pathToFileURL } from "node:url";
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

/** The bytes of each cache V8 took, as Node says (--profile-deserialization, on standard output). */
const deserialized = (stdout: string) => [...stdout.matchAll(/^\[Deserializing from (\d+) bytes/gm)].map((m) => Number(m[1]));

/**
 * Runs a program importing a copy of dist/ with `change` made to it, under this runtime (Node:
 * with --profile-deserialization and `flags`): what it saw, and on Node the bytes of each cache V8
 * took. The default program redefines the parent-id function to the process-id one, restores it,
 * and reports both, the top frame of an error and, on Bun, the files of the copy Bun loaded.
 */
function inCopy(change: (dist: string) => void, flags: string[] = [], program?: (mod: string) => string) {
  const dir = mkdtempSync(join(tmpdir(), "redefine-dist-"));
  try {
    const copy = join(dir, "dist");
    cpSync(fileURLToPath(new URL("../dist/", import.meta.url)), copy, { recursive: true });
    change(copy);
    const mod = pathToFileURL(join(copy, "mod.js")).href;
    const calls = runtimeName === "bun"
      ? `(await import("bun:ffi")).dlopen("libc.so.6", { getppid: { args: [], returns: "i32" } }).symbols`
      : `process.getBuiltinModule("node:ffi").dlopen("libc.so.6", { getppid: { arguments: [], return: "int32" } }).functions`;
    // Bun's require.cache holds the modules it loaded, ES modules too.
    const loaded = runtimeName === "bun"
      ? `Object.keys((await import("node:module")).createRequire(import.meta.url).cache).filter((p) => p.startsWith(${JSON.stringify(copy + sep)})).map((p) => p.slice(${copy.length + 1})).toSorted()`
      : "null";
    const source = program?.(mod) ?? `const { redefine } = await import(${JSON.stringify(mod)});
const calls = ${calls};
const patch = redefine({ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" });
const patched = calls.getppid();
patch.restore();
let top = "";
try { redefine({ symbol: "redefine_no_such_function", parameters: [], result: "i32" }, () => 0); } catch (e) { top = e.stack.split("\\n")[1]; }
console.log(JSON.stringify({ patched: patched === process.pid, restored: calls.getppid() === process.ppid, top, loaded: ${loaded} }));`;
    const file = join(dir, "program.mjs");
    writeFileSync(file, source);
    const args = runtimeName === "node" ? ["--no-warnings", "--profile-deserialization", ...flags, file] : [...flags, file];
    const child = spawnSync(runtimePath, args, { encoding: "utf8" });
    const why = `status ${child.status}, signal ${child.signal}\n${child.stdout}\n${child.stderr.slice(-2000)}`;
    assert.equal(child.status, 0, why);
    const line = child.stdout.split("\n").filter((l) => l.startsWith("{")).at(-1);
    assert.ok(line, why);
    return { seen: JSON.parse(line), caches: deserialized(child.stdout), why };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (precompiled && runtimeName === "bun") {
  test("bundle: Bun takes the bytecode the build compiled beside dist/linux-x64.bun.cjs (its .jsc)", () => {
    // JavaScriptCore says what its disk cache served; the fixture checks the rest.
    const fixture = fileURLToPath(new URL("./fixtures/bundle.ts", import.meta.url));
    const child = spawnSync(runtimePath, [fixture], { encoding: "utf8", env: { ...process.env, BUN_JSC_verboseDiskCache: "1" } });
    const why = `status ${child.status}, signal ${child.signal}\n${child.stdout}\n${child.stderr.slice(-2000)}`;
    assert.equal(child.status, 0, why);
    assert.match(`${child.stdout}${child.stderr}`, /^\[Disk Cache\] Cache hit for sourceCode$/m, why);
  });
}

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

// Where the CommonJS file is missing (a publish leaving it out, a packager dropping .cjs files) or
// does not load, dist/mod.js runs the module, as Node's loader does where its script is missing.
if (precompiled && runtimeName === "bun") {
  test("bundle: Bun loads the module where dist/linux-x64.bun.cjs is missing, does not parse or throws", () => {
    const intact = inCopy(() => {});
    assert.deepEqual(intact.seen.loaded, ["linux-x64.bun.cjs", "mod.js"], `the copy's CommonJS form serves: ${intact.why}`);
    const cjs = (dist: string) => join(dist, "linux-x64.bun.cjs");
    const cases: [string, (dist: string) => void][] = [
      ["missing, its bytecode kept", (dist) => rmSync(cjs(dist))],
      ["not parsing", (dist) => writeFileSync(cjs(dist), "module.exports = (;\n")],
      ["throwing as it loads", (dist) => writeFileSync(cjs(dist), `throw new Error("not this file");\n`)],
    ];
    for (const [what, change] of cases) {
      const { seen, why } = inCopy(change);
      assert.deepEqual([seen.patched, seen.restored], [true, true], `${what}: ${why}`);
      assert.deepEqual(seen.loaded, ["linux-x64.js", "mod.js"], `${what}: the module ran (${why})`);
    }
  });
}

// JSR serves dist/deno.js on every runtime, which never loads the precompiled forms: deno.json
// leaves them out of the publish (scripts/test.mjs checks its dry run), and dist/mod.js, which JSR
// ships too, then loads the module.
if (precompiled) {
  test("bundle: a copy of dist/ without the precompiled forms, as deno.json publishes it to JSR, runs the module", () => {
    const { seen, why } = inCopy((dist) => {
      const left = readdirSync(dist).filter((file) => /\.(script\.js|node-cache|bun\.cjs(\.\w+)?)$/.test(file));
      assert.equal(left.length, 5, `the script, Node's cache, the CommonJS file, its bytecode and its map: ${left.join(", ")}`);
      for (const file of left) rmSync(join(dist, file));
    });
    assert.deepEqual([seen.patched, seen.restored], [true, true], why);
    // Bun maps the frame into the sources by itself; Node, without --enable-source-maps, does not.
    if (runtimeName === "bun") assert.deepEqual(seen.loaded, ["linux-x64.js", "mod.js"], `the module ran: ${why}`);
    else assert.match(seen.top, /[/\\]dist[/\\]linux-x64\.js:\d+:\d+/, `the module ran: ${why}`);
  });
}

// Node without source maps (its default) runs this system's bundle as a script with the code cache
// the build made, which Node maps no stack trace of: the test above sees the module.
if (precompiled && runtimeName === "node") {
  const cacheSize = () => statSync(fileURLToPath(new URL("../dist/linux-x64.node-cache", import.meta.url))).size;

  test("bundle: Node without source maps runs the bundle as a script with the code cache its V8 takes, and it redefines, restores and names its errors", () => {
    const fixture = fileURLToPath(new URL("./fixtures/bundle.ts", import.meta.url));
    const child = spawnSync(runtimePath, ["--no-warnings", "--profile-deserialization", fixture], { encoding: "utf8" });
    const line = child.stdout.split("\n").filter((l) => l.startsWith("{")).at(-1);
    assert.equal(child.status, 0, `status ${child.status}, signal ${child.signal}\n${child.stdout}\n${child.stderr.slice(-2000)}`);
    const seen = { ...JSON.parse(line!), why: line! }, { why } = seen;
    assertRedefinedAndNamed(seen);
    assert.equal(seen.sourceMaps, false, why);
    assert.match(seen.refused.top, /[/\\]dist[/\\]linux-x64\.script\.js:\d+:\d+/, "the script ran, not the module");
    assert.equal(seen.cacheTaken, true, "this Node takes the code cache the build made (by npm's node: run the tests with the Node that built dist/)");
    // The fixture's check compiles a script of its own with the cache: V8 took it twice, for that
    // and for dist/mod.js.
    const taken = deserialized(child.stdout).filter((size) => size === cacheSize()).length;
    assert.equal(taken, 2, `V8 took dist/linux-x64.node-cache (${cacheSize()} bytes) for dist/mod.js and for the fixture's check`);
  });

  test("bundle: a corrupted Node cache, or a script edited to the same length, is not given to V8: the script runs from its text", () => {
    const size = cacheSize();
    const intact = inCopy(() => {});
    assert.ok(intact.caches.includes(size), `the copy's cache is taken: ${intact.why}`);
    const cases: [string, (dist: string) => void][] = [
      // V8 checks no checksum of a cache: flipped bytes in it abort the process inside new Script.
      ["flipped bytes in the cache", (dist) => {
        const file = join(dist, "linux-x64.node-cache");
        const bytes = readFileSync(file);
        for (let i = bytes.length >> 1; i < (bytes.length >> 1) + 64; i++) bytes[i]! ^= 0xff;
        writeFileSync(file, bytes);
      }],
      // V8 checks only the script's length: it would run the cache's code for the old text.
      ["the script edited, its length kept", (dist) => {
        const file = join(dist, "linux-x64.script.js");
        const text = readFileSync(file, "utf8");
        assert.ok(text.includes(`"use strict"`));
        writeFileSync(file, text.replace(`"use strict"`, `'use strict'`));
      }],
    ];
    for (const [what, change] of cases) {
      const { seen, caches, why } = inCopy(change);
      assert.deepEqual([seen.patched, seen.restored], [true, true], `${what}: ${why}`);
      assert.match(seen.top, /[/\\]dist[/\\]linux-x64\.script\.js:\d+:\d+/, `${what}: the script ran, not the module`);
      assert.ok(!caches.includes(size), `${what}: no cache of ${size} bytes was given to V8 (${caches.join(", ")})`);
    }
  });

  test("bundle: dist/mod.js evaluated in a vm context loads the module there, not the script in Node's main context", () => {
    // As Jest (--experimental-vm-modules) and Vitest's vmThreads run a test file: the context has
    // Node's globals, each module is a SourceTextModule of it.
    const { seen, why } = inCopy(() => {}, ["--experimental-vm-modules"], (mod) => `import vm from "node:vm";
import { readFileSync } from "node:fs";
const context = vm.createContext({ process, console, URL, TextEncoder, TextDecoder, queueMicrotask, setTimeout, clearTimeout, performance, Buffer });
const modules = new Map();
async function load(url) {
  if (modules.has(url)) return modules.get(url);
  const module = new vm.SourceTextModule(readFileSync(new URL(url), "utf8"), {
    identifier: url, context,
    initializeImportMeta: (meta) => { meta.url = url; },
    importModuleDynamically: (specifier) => load(new URL(specifier, url).href),
  });
  modules.set(url, module);
  await module.link(() => { throw new Error("no static imports"); });
  await module.evaluate();
  return module;
}
const { redefine } = (await load(${JSON.stringify(mod)})).namespace;
const calls = process.getBuiltinModule("node:ffi").dlopen("libc.so.6", { getppid: { arguments: [], return: "int32" } }).functions;
const patch = redefine({ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" });
const patched = calls.getppid();
patch.restore();
console.log(JSON.stringify({
  patched: patched === process.pid, restored: calls.getppid() === process.ppid,
  ownRealm: Object.getPrototypeOf(redefine) === vm.runInContext("Function.prototype", context),
  loaded: [...modules.keys()].map((url) => url.slice(url.lastIndexOf("/") + 1)),
}));`);
    assert.deepEqual(seen, { patched: true, restored: true, ownRealm: true, loaded: ["mod.js", "linux-x64.js"] }, why);
  });
}

// The build makes the same bytes wherever and whenever it runs (scripts/build.mjs
// NODE_CACHE_FLAGS: V8 lays the hash tables of Node's cache out by a seed of its own each run,
// and keeps the build's path in it), but for a few bits of Node's cache that V8's garbage
// collections set by their timing: on a loaded machine ~1 build in 4 has 4 bytes apart, of the
// same length (README, Install). Run by one runtime: the build is the same for all.
if (precompiled && runtimeName === "node") {
  test("bundle: a build of the same sources in another directory makes dist/ byte for byte, Node's cache but a few bits", () => {
    const root = fileURLToPath(new URL("../", import.meta.url));
    const dir = mkdtempSync(join(tmpdir(), "redefine-build-"));
    try {
      for (const path of ["mod.ts", "src", "platform", "scripts", "package.json", "tsconfig.dist.json"]) {
        cpSync(join(root, path), join(dir, path), { recursive: true });
      }
      symlinkSync(realpathSync(join(root, "node_modules")), join(dir, "node_modules"));
      const build = spawnSync(process.execPath, [join(dir, "scripts", "build.mjs")], { cwd: dir, encoding: "utf8" });
      assert.equal(build.status, 0, `${build.stdout}\n${build.stderr}`);
      /** Every file under `dist`, by its path there, and its bytes. */
      const files = (dist: string) =>
        new Map((readdirSync(dist, { recursive: true }) as string[]).toSorted()
          .filter((file) => statSync(join(dist, file)).isFile())
          .map((file) => [file, readFileSync(join(dist, file))]));
      const ours = files(join(root, "dist")), again = files(join(dir, "dist"));
      assert.deepEqual([...again.keys()], [...ours.keys()], "the same files");
      const cache = "linux-x64.node-cache";
      // dist/mod.js holds the cache's digest: the same but for it.
      const digest = /\d+:[0-9a-z]+(?=")/;
      const text = (file: Map<string, Buffer>) => file.get("mod.js")!.toString().replace(digest, "");
      const differ = [...ours.keys()].filter((file) => file !== cache && file !== "mod.js" && !ours.get(file)!.equals(again.get(file)!));
      assert.deepEqual(differ, [], "the same bytes (this checkout's dist/ is built from its sources: npm test builds it first)");
      assert.equal(text(again), text(ours), "dist/mod.js the same but for the cache's digest");
      const [a, b] = [ours.get(cache)!, again.get(cache)!];
      assert.equal(b.length, a.length, "Node's cache of the same length");
      const apart = a.reduce((n, byte, i) => n + (byte !== b[i] ? 1 : 0), 0);
      assert.ok(apart <= 8, `Node's cache the same but for a few bytes: ${apart} apart`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
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

