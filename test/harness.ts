/**
 * One test API for the three runtimes: `deno test` registers through `Deno.test`, `bun test` through
 * `bun:test`, `node --test` through `node:test`. Assertions come from `node:assert/strict`, which all
 * three provide.
 */
export { default as assert } from "node:assert/strict";
import process from "node:process";

type TestFn = () => void | Promise<void>;

const isDeno = typeof (globalThis as { Deno?: unknown }).Deno !== "undefined";
const isBun = typeof (globalThis as { Bun?: unknown }).Bun !== "undefined";
// A static `bun:` import fails under Deno and Node at load time, so it must stay dynamic.
const bunTest: ((name: string, fn: TestFn, timeout?: number) => void) | undefined = isBun
  ? (await import("bun:test" as string)).test
  : undefined;
const nodeTest: ((name: string, options: { timeout: number }, fn: TestFn) => void) | undefined =
  isDeno || isBun ? undefined : (await import("node:test")).test;

/** Registers one test under whichever runtime runs the file. */
export function test(name: string, fn: TestFn): void {
  if (isDeno) {
    // FFI tests open libraries and callbacks that live for the process: the resource and op
    // sanitizers would report those as leaks.
    Deno.test({ name, fn, sanitizeResources: false, sanitizeOps: false });
  } else if (bunTest) {
    bunTest(name, fn, 60_000);
  } else {
    nodeTest!(name, { timeout: 60_000 }, fn);
  }
}

/** The runtime running the tests. */
export const runtimeName: "deno" | "bun" | "node" = isDeno ? "deno" : isBun ? "bun" : "node";

/**
 * The executable running the tests, for child processes of the same runtime: under emulation an
 * arm64 one, which the kernel starts through qemu (binfmt_misc, registered by scripts/test_arm64.mjs).
 */
export const runtimePath: string = isDeno ? Deno.execPath() : process.execPath;
