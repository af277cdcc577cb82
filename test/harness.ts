/**
 * One test API for the three runtimes: `deno test` registers through `Deno.test`, `bun test` through
 * `bun:test`, `node --test` through `node:test`. Assertions come from `node:assert/strict`, which all
 * three provide.
 */
export { default as assert } from "node:assert/strict";
import assert from "node:assert/strict";
import { spawnSync, type SpawnSyncReturns } from "node:child_process";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { RedefineError, type RedefineErrorCode } from "../src/errors.ts";

type TestFn = () => void | Promise<void>;

const isDeno = typeof (globalThis as { Deno?: unknown }).Deno !== "undefined";
const isBun = typeof (globalThis as { Bun?: unknown }).Bun !== "undefined";
// A static `bun:` import fails under Deno and Node at load time, so it must stay dynamic.
type BunTest = ((name: string, fn: TestFn, timeout?: number) => void) & { skip(name: string, fn: TestFn): void };
const bunTest: BunTest | undefined = isBun ? (await import("bun:test" as string)).test : undefined;
type NodeTest = (name: string, options: { timeout: number; skip?: string | undefined }, fn: TestFn) => void;
const nodeTest: NodeTest | undefined = isDeno || isBun ? undefined : (await import("node:test")).test;

/** How a test is registered. */
export interface TestOptions {
  /**
   * Why the test cannot run here (an optional system tool or library is missing): it is then
   * reported as skipped, never passed, with the reason in its name.
   */
  skip?: string | undefined;
}

/** Registers one test under whichever runtime runs the file. */
export function test(name: string, fn: TestFn, options: TestOptions = {}): void {
  const title = options.skip === undefined ? name : `${name} (skipped: ${options.skip})`;
  if (isDeno) {
    // FFI tests open libraries and callbacks that live for the process: the resource and op
    // sanitizers would report those as leaks.
    Deno.test({ name: title, fn, ignore: options.skip !== undefined, sanitizeResources: false, sanitizeOps: false });
  } else if (bunTest && options.skip !== undefined) {
    bunTest.skip(title, fn);
  } else if (bunTest) {
    bunTest(name, fn, 60_000);
  } else {
    nodeTest!(title, { timeout: 60_000, skip: options.skip }, fn);
  }
}

/** The runtime running the tests. */
export const runtimeName: "deno" | "bun" | "node" = isDeno ? "deno" : isBun ? "bun" : "node";

/**
 * The executable running the tests, for child processes of the same runtime: under emulation an
 * arm64 one, which the kernel starts through qemu (binfmt_misc, registered by scripts/test_arm64.mjs).
 */
export const runtimePath: string = isDeno ? Deno.execPath() : process.execPath;

/**
 * Runs `script` with `args` in a child process of this runtime, as a user's program, to its end:
 * Deno with every permission, Node mapping stack traces through source maps (Deno and Bun do so by
 * themselves). A path, not the URL's pathname: Windows has drive letters.
 */
export function spawnRuntime(script: URL, args: readonly string[] = [], timeout = 60_000): SpawnSyncReturns<string> {
  const path = fileURLToPath(script);
  const runner = runtimeName === "deno"
    ? ["run", "-A", "--no-check", path]
    : runtimeName === "node"
    ? ["--enable-source-maps", "--no-warnings", path]
    : [path];
  return spawnSync(runtimePath, [...runner, ...args], { encoding: "utf8", timeout, env: { ...process.env, NO_COLOR: "1" } });
}

/**
 * `spawnRuntime`'s run, which must end by itself with status 0; the last line of JSON it printed,
 * parsed (what JSON.parse gives: the caller knows its shape).
 */
export function fixtureJson(script: URL, args: readonly string[] = [], timeout = 60_000): ReturnType<typeof JSON.parse> {
  const child = spawnRuntime(script, args, timeout);
  const json = child.stdout.split("\n").filter((line) => /^[[{]/.test(line)).at(-1);
  const why = `status ${child.status}, signal ${child.signal}\n${child.stdout}\n${child.stderr.slice(-2000)}`;
  assert.equal(child.signal, null, why);
  assert.equal(child.status, 0, why);
  assert.ok(json, why);
  return JSON.parse(json);
}

/**
 * Asserts that `fn` throws a `RedefineError` with `code`, and a message matching `message` when
 * given: the one check of every test that expects a typed failure.
 */
export function assertCode(fn: () => unknown, code: RedefineErrorCode, message?: RegExp): void {
  assert.throws(fn, (error: unknown) => {
    assert.ok(error instanceof RedefineError, `expected a RedefineError, got ${error}`);
    assert.equal(error.code, code, error.message);
    if (message) assert.match(error.message, message);
    return true;
  });
}
