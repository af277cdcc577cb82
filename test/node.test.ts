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
