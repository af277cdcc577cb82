/**
 * Cases that may crash the process run in a child process of the same runtime, so a crash is one
 * failed test rather than a dead suite. A fixture file names its cases with `cases({...})`; a test
 * runs one with `runCase(fixture, name)` and gets back what the case returned. `snapshot` is what
 * every bad-input case compares before and after: nothing written.
 */
import { assert, spawnRuntime } from "./harness.ts";
import { bytesAt, protectionAt, writableExecutable } from "./native.ts";
import type { SpawnSyncReturns } from "node:child_process";
import process from "node:process";

const MARK = "CASE RESULT ";

/** Bigints survive the trip as `"123n"` strings. */
function encode(_key: string, value: unknown): unknown {
  return typeof value === "bigint" ? `${value}n` : value;
}

/**
 * Runs the case named on the command line and prints what it returns; a case that throws, or
 * crashes, ends the child with a failure the parent reports.
 */
export async function cases(table: Record<string, () => unknown>): Promise<void> {
  const name = process.argv[2];
  const body = table[name];
  if (!body) throw new Error(`no case '${name}': one of ${Object.keys(table).join(", ")}`);
  let result: unknown;
  try {
    result = await body();
  } catch (error) {
    // Printed here: a fixture's own uncaught-error handler must not swallow the case's failure.
    console.error(`case '${name}' threw:`, error);
    process.exit(1);
  }
  console.log(MARK + JSON.stringify(result ?? null, encode));
  // Deno keeps running while callbacks are open; the case is over.
  process.exit(0);
}

/**
 * Runs case `name` of `fixture` in a child and returns its result; fails the calling test, with the
 * child's signal and output, when the child crashes, hangs past `timeout` ms or throws.
 */
export function runCase(fixture: URL, name: string, timeout = 60_000): unknown {
  const child = spawnCase(fixture, name, timeout);
  const output = `${child.stdout ?? ""}${child.stderr ?? ""}`;
  const line = (child.stdout ?? "").split("\n").find((l) => l.startsWith(MARK));
  assert.ok(
    child.status === 0 && line !== undefined,
    `case '${name}' ended with status ${child.status}, signal ${child.signal}` +
      `${child.error ? ` (${child.error.message})` : ""}:\n${output.slice(-3000)}`,
  );
  return JSON.parse(line!.slice(MARK.length));
}

/** Runs case `name` of `fixture` in a child of this runtime, to its end: how it ended, what it printed. */
export function spawnCase(fixture: URL, name: string, timeout = 60_000): SpawnSyncReturns<string> {
  return spawnRuntime(fixture, [name], timeout);
}

/** The code bytes and page protections at `addresses`, and the writable+executable file mappings. */
export function snapshot(addresses: readonly bigint[]): string {
  return JSON.stringify({
    code: addresses.map((a) => ({ bytes: [...bytesAt(a, 32)].join(), protection: protectionAt(a) })),
    wx: writableExecutable(),
  });
}

/** What a failed call reported: the error's kind, for comparing across the process boundary. */
export function codeOf(error: unknown): string {
  const e = error as { name?: string; code?: string; message?: string };
  return e?.name === "RedefineError" ? e.code! : `${e?.name}: ${e?.message}`;
}
