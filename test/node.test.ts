/**
 * What the Node adapter adds to node:ffi, seen from every runtime: calls through an address by an
 * absolute symbol, booleans as booleans (node:ffi passes numbers); and, in a child Node 26 (the
 * project's, from npm): no node:ffi, the permission model, a JS replacement that throws or returns
 * what its result type cannot hold (node:ffi would abort the process).
 */
import { assert, runtimeName, runtimePath, test } from "./harness.ts";
import { execFileSync } from "node:child_process";
import { buildStubImage } from "../platform/mod.ts";
import { archFor } from "../src/arch/mod.ts";
import { libc, os, runtime } from "./native.ts";

const node = runtimeName === "node" ? runtimePath : new URL("../node_modules/.bin/node", import.meta.url).pathname;
const mod = new URL("../mod.ts", import.meta.url).href;
const platformMod = new URL("../platform/mod.ts", import.meta.url).href;

/** Runs the ES module `script` in a child Node with `flags` and gives its output. */
function childNode(flags: string[], script: string): string {
  return execFileSync(node, [...flags, "--no-warnings", "--input-type=module", "-"], { input: script, encoding: "utf8" });
}

test("a library whose symbol is absolute: dlsym gives the address itself, and calling the symbol calls it", () => {
  const labs = os.symbolAddress("labs");
  const image = buildStubImage({
    machine: archFor(runtime.arch).name,
    count: 2,
    prefix: "redefine_test_absolute_",
    stubSize: 0,
    jump: () => new Uint8Array(0),
    targets: [labs, os.symbolAddress("getppid")],
  });
  const path = os.loadableImage(image.bytes);
  assert.equal(os.symbolAddress(image.name(0), path), labs);
  const bound = runtime.open(path, {
    [image.name(0)]: { parameters: ["i64"], result: "i64" },
    [image.name(1)]: { parameters: [], result: "i32" },
  });
  assert.equal(bound[image.name(0)]!(-42n), 42n);
  assert.equal(bound[image.name(1)]!(), libc.getppid());
});

test("booleans cross the FFI as booleans, into a callback and out of a call through its address", () => {
  const seen: unknown[] = [];
  const callback = runtime.callback({ parameters: ["bool", "i64"], result: "bool" }, (flag: boolean, n: bigint) => {
    seen.push(flag, n);
    return !flag;
  });
  try {
    const call = runtime.fnPointer(callback.address, { parameters: ["bool", "i64"], result: "bool" });
    assert.equal(call(true, 5n), false);
    assert.equal(call(false, 6n), true);
    assert.deepEqual(seen, [true, 5n, false, 6n]);
  } finally {
    callback.close();
  }
});

test("Node without node:ffi (--no-experimental-ffi): UNSUPPORTED_PLATFORM saying what to do", () => {
  const out = childNode(["--no-experimental-ffi"], `import { redefine } from "${mod}";
try { redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => 1); }
catch (e) { console.log(e.code + ": " + e.message); }`);
  assert.match(out, /^UNSUPPORTED_PLATFORM: redefine needs node:ffi, .*Node 26 or later/);
});

test("Node under the permission model without --allow-ffi: FFI_PERMISSION naming the flag", () => {
  const out = childNode(["--permission", "--allow-fs-read=*"], `import { redefine } from "${mod}";
try { redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => 1); }
catch (e) { console.log(e.code + ": " + e.message); }`);
  assert.match(out, /^FFI_PERMISSION: .*--allow-ffi/);
});

test("Node: a JS replacement that throws returns 0 to its native caller, then the error is uncaught", () => {
  // execFileSync throws if the child aborts or exits with an error.
  const out = childNode([], `import { redefine } from "${mod}";
import { platform } from "${platformMod}";
process.on("uncaughtException", (e) => console.log("uncaught: " + e.message));
const libc = platform().runtime.open("libc.so.6", { getppid: { parameters: [], result: "i32" } });
const patch = redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => { throw new Error("from the replacement"); });
console.log("getppid() = " + libc.getppid());
patch.restore();
console.log("restored: " + (libc.getppid() === process.ppid));`);
  assert.match(out, /^getppid\(\) = 0\nrestored: true\nuncaught: from the replacement\n$/);
});

test("Node: a JS replacement returning what its result type cannot hold: 0, then BAD_REPLACEMENT uncaught", () => {
  const out = childNode([], `import { redefine } from "${mod}";
import { platform } from "${platformMod}";
process.on("uncaughtException", (e) => console.log("uncaught: " + e.code + ": " + e.message));
const libc = platform().runtime.open("libc.so.6", { getppid: { parameters: [], result: "i32" } });
const patch = redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => 2 ** 40);
console.log("getppid() = " + libc.getppid());
patch.restore();`);
  assert.match(out, /^getppid\(\) = 0\nuncaught: BAD_REPLACEMENT: the replacement returned 1099511627776, which i32 cannot hold/);
});

test("a symbol bound again with another signature: each binding calls it as it was declared", () => {
  // Node keeps one library a path, and node:ffi refuses a name asked for again otherwise.
  const wide = runtime.open("libc.so.6", { labs: { parameters: ["i64"], result: "i64" } }).labs!;
  const narrow = runtime.open("libc.so.6", { labs: { parameters: ["i32"], result: "i32" } }).labs!;
  const again = runtime.open("libc.so.6", { labs: { parameters: ["i64"], result: "i64" } }).labs!;
  assert.equal(wide(-5n), 5n);
  assert.equal(narrow(-7), 7);
  assert.equal(again(-(2n ** 40n)), 2n ** 40n);
  // node:ffi takes `function` for `pointer` (the same signature to it), but only the first keeps a
  // call off its fast path, where JS run inside the call may abort V8: each is its own function.
  const plain = runtime.open("libc.so.6", { strtol: { parameters: ["buffer", "pointer", "i32"], result: "i64" } }).strtol!;
  const mayRunJs = runtime.open("libc.so.6", { strtol: { parameters: ["buffer", "pointer", "i32"], result: "i64", callback: true } }).strtol!;
  assert.notEqual(plain, mayRunJs);
  assert.equal(mayRunJs(new TextEncoder().encode("-42\0"), 0n, 10), -42n);
});

test("Node: an original's stub slot, freed by a collected patch of one signature, serves the next patch's of another", () => {
  // The bool wrapper of a call is garbage once the patch is: its slot goes back to the pool, and
  // the next original takes it with another signature, bound from the same stub library.
  const out = childNode(["--expose-gc"], `import { redefine } from "${mod}";
let patch = redefine({ symbol: "isatty", parameters: ["i32"], result: "bool" }, () => true);
const first = patch.original(-1);
patch.restore();
patch = null;
for (let i = 0; i < 5; i++) {
  globalThis.gc();
  await new Promise((resolve) => setTimeout(resolve, 10));
}
const labs = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, () => 0n);
try {
  console.log(first + " " + labs.original(-5n));
} finally {
  labs.restore();
}`);
  assert.equal(out, "false 5\n");
});
