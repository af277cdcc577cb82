#!/usr/bin/env bun
/**
 * The trace command: counts and times the calls a script makes into native libraries, in the
 * script's own process, with native probes (no JS on the traced functions' path, so the runtime's
 * own calls are traced too).
 *
 * ```sh
 * deno run -A jsr:@redefine/redefine/trace --library libz.so.1 --match 'crc32*,deflate*' -- script.ts
 * bunx redefine-trace --library libc.so.6 --match 'str*' --json trace.json --svg trace.svg -- script.ts
 * ```
 *
 * It loads the libraries, attaches to every matched export, then imports the script (which sees
 * its own arguments in `Deno.args` and `process.argv`; `import.meta.main` is false in it). At exit
 * — the script's last task done, `Deno.exit()` / `process.exit()`, or Ctrl-C — it prints a table on
 * stderr, sorted by total time (function, calls, total, mean, share), writes `--json` and `--svg`,
 * and lists the functions it could not trace with the reason. `--help` lists the options.
 *
 * @module
 */
import process from "node:process";
import { writeFileSync } from "node:fs";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { parseOptions, USAGE, UsageError } from "./options.ts";
import type { TraceOptions } from "./options.ts";
import { startTrace } from "./session.ts";
import type { Session } from "./session.ts";
import { clockRate } from "./native_probe.ts";
import { liveLine } from "./live.ts";
import { table, toJson, toSvg } from "./report.ts";

/**
 * Runs the trace command with `argv` (the arguments after the command's name): traces, runs the
 * script, and reports when the process exits. Resolves with the exit code to set (2 for a bad
 * command line, 1 when the script threw).
 *
 * @example
 * ```ts
 * import { trace } from "./cli.ts";
 * await trace(["--library", "libc.so.6", "--match", "strto*", "--", "./my_script.ts"]);
 * ```
 */
export async function trace(argv: readonly string[]): Promise<number> {
  let options: TraceOptions;
  try {
    options = parseOptions(argv);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(`redefine-trace: ${error.message}\n\n${USAGE}`);
    return 2;
  }
  if (options.help) {
    console.log(USAGE);
    return 0;
  }
  const ticksPerNs = options.countOnly ? null : clockRate();
  let session: Session | null = null;
  let stopLive = () => {};
  let started = performance.now();
  // The outputs' paths made absolute now: the script may change directory, and Bun for Windows
  // (1.4.5, under Wine) cannot create a file by a relative path (ENOENT) though it reads one.
  const json = options.json === null ? null : resolve(options.json);
  const svg = options.svg === null ? null : resolve(options.svg);
  // Registered before the first probe registers redefine's own restore-at-exit, so it runs first:
  // the probes are read while their records are live.
  onExit(() => {
    if (!session) return;
    stopLive();
    const result = session.results(ticksPerNs, (performance.now() - started) * 1e6);
    const stayed = session.stop();
    printError(`\n${table(result)}`);
    for (const message of stayed) printError(`left in place: ${message}`);
    if (json) writeFileSync(json, toJson(result));
    if (svg) writeFileSync(svg, toSvg(result));
  });
  // A long run stopped with Ctrl-C reports too: the exit that follows runs the report.
  process.on("SIGINT", () => process.exit(130));
  const running = startTrace(options, printError);
  session = running;
  const script = resolve(options.script!);
  process.argv = [process.argv[0], script, ...options.args];
  const deno = (globalThis as { Deno?: object }).Deno;
  if (deno) Object.defineProperty(deno, "args", { value: [...options.args], configurable: true });
  started = performance.now();
  stopLive = liveLine(() => `[redefine-trace] ${running.calls().toLocaleString("en-US")} calls so far`);
  try {
    await import(pathToFileURL(script).href);
  } catch (error) {
    console.error(error);
    return 1;
  }
  return 0;
}

/** A line on stderr as it is (console.error would colour it on a terminal under Bun). */
function printError(line: string): void {
  process.stderr.write(`${line}\n`);
}

/** Runs `report` when the process exits normally (Deno's `unload` event, Node's and Bun's `exit`). */
function onExit(report: () => void): void {
  const global = globalThis as { Deno?: unknown; addEventListener?: (type: string, listener: () => void) => void };
  if (global.Deno !== undefined) global.addEventListener!("unload", report);
  else process.on("exit", report);
}

if (import.meta.main) process.exitCode = await trace(process.argv.slice(2));
