/**
 * The trace command: its command line and report as pure functions, then the command itself run
 * as a child process of the runtime running the tests, on a script that calls libc N times.
 */
import { assert, runtimeName, runtimePath, test } from "./harness.ts";
import { spawn, spawnSync } from "node:child_process";
import process from "node:process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { globMatches, parseOptions, parseSignature, UsageError } from "../src/trace/options.ts";
import { duration, table, toJson, toSvg } from "../src/trace/report.ts";
import type { TraceResult } from "../src/trace/report.ts";
import { machine } from "../src/registry.ts";
import { find } from "../src/introspect.ts";

test("trace options: libraries with their globs, callers, signatures, outputs, the script and its arguments", () => {
  const options = parseOptions([
    "--library", "libz.so.1", "--match", "crc32*,deflate*", "--library=libc.so.6",
    "--callers", "libsqlite3.so.0", "--signature", "crc32(u64,pointer,u32):u64",
    "--json", "out.json", "--svg", "out.svg", "--count-only", "--", "script.ts", "--match", "x",
  ]);
  assert.deepEqual(options.libraries, [
    { library: "libz.so.1", match: ["crc32*", "deflate*"] },
    { library: "libc.so.6", match: ["*"] },
  ]);
  assert.deepEqual(options.callers, ["libsqlite3.so.0"]);
  assert.deepEqual(options.signatures, [{ symbol: "crc32", parameters: ["u64", "pointer", "u32"], result: "u64" }]);
  assert.equal(options.json, "out.json");
  assert.equal(options.svg, "out.svg");
  assert.equal(options.countOnly, true);
  assert.equal(options.script, "script.ts");
  assert.deepEqual(options.args, ["--match", "x"], "what follows the script is the script's");
});

test("trace options: what cannot run is a UsageError saying what to give", () => {
  const fails = (argv: string[], message: RegExp) =>
    assert.throws(() => parseOptions(argv), (e: unknown) => e instanceof UsageError && message.test(e.message));
  fails(["--library", "libc.so.6"], /no script to run/);
  fails(["--", "script.ts"], /nothing to trace/);
  fails(["--match", "x*", "--", "s.ts"], /--match applies to the --library before it/);
  fails(["--library"], /--library needs a value/);
  fails(["--library", "libc.so.6", "--json=", "--", "s.ts"], /--json needs a value, not an empty one/);
  fails(["--library", "", "--", "s.ts"], /--library needs a value, not an empty one/);
  fails(["--frobnicate", "--", "s.ts"], /unknown option '--frobnicate'/);
  fails(["--signature", "crc32(u64", "--", "s.ts"], /not of the form name\(type,...\):type/);
  fails(["--signature", "f(int):u64", "--", "s.ts"], /parameters\[0\] is 'int', not a native type/);
  assert.deepEqual(parseSignature("getpid()"), { symbol: "getpid", parameters: [], result: "void" });
  assert.equal(parseOptions(["--help"]).help, true);
});

test("trace globs: * and ? over whole names, nothing else special", () => {
  assert.ok(globMatches("crc32*", "crc32_combine"));
  assert.ok(globMatches("*", "anything"));
  assert.ok(globMatches("str?", "strx"));
  assert.ok(!globMatches("str?", "strxy"));
  assert.ok(!globMatches("crc32", "crc32_z"));
  assert.ok(globMatches("a.b+c", "a.b+c"));
  assert.ok(!globMatches("a.b", "axb"));
});

const RESULT: TraceResult = {
  runtime: "deno",
  ticksPerNs: 2.5,
  wallNs: 5e6,
  functions: [
    { library: "libz.so.1", name: "crc32", address: 0x1000n, calls: 10, timed: 10, totalNs: 3000, timing: true },
    { library: "libz.so.1", name: "deflate<&>", address: 0x2000n, calls: 2, timed: 2, totalNs: 1e6, timing: true },
    { library: "libz.so.1", name: "inflate", address: 0x3000n, calls: 0, timed: 0, totalNs: 0, timing: true },
    { library: "libc.so.6", name: "setjmp", address: 0x4000n, calls: 3, timed: 0, totalNs: 0, timing: false },
  ],
  refused: [{ library: "libz.so.1", name: "zlibVersion", code: "FUNCTION_TOO_SHORT", reason: "too short." }],
};

test("trace report: the table sorted by total time, with calls, total, mean, share and the refusals", () => {
  const lines = table(RESULT).split("\n");
  assert.match(lines[0], /^function\s+calls\s+total\s+mean\s+share$/);
  assert.match(lines[1], /^libz\.so\.1:deflate<&>\s+2\s+1\.00 ms\s+500\.00 µs\s+99\.7%$/);
  assert.match(lines[2], /^libz\.so\.1:crc32\s+10\s+3\.00 µs\s+300 ns\s+0\.3%$/);
  assert.match(lines[3], /^libc\.so\.6:setjmp\s+3\s+-\s+-\s+-$/, "counted, not timed");
  assert.match(lines[4], /^3 of 4 traced functions called/);
  assert.match(table(RESULT), /not traced \(1\):\n {2}libz\.so\.1:zlibVersion: FUNCTION_TOO_SHORT: too short\./);
  assert.equal(duration(1.5e9), "1.50 s");
  assert.doesNotMatch(table(RESULT), /counted but not timed/);
  const recursive = { ...RESULT, functions: [{ ...RESULT.functions[0], timed: 4 }] };
  assert.match(table(recursive), /^libz\.so\.1:crc32\s+10\s+3\.00 µs\s+750 ns\s+100\.0%$/m, "the mean is over timed calls");
  assert.match(table(recursive), /1 with calls counted but not timed: .*\(recursion, other threads\)/);
});

test("trace report: JSON with every traced function, most time first, and the refusals", () => {
  const json = JSON.parse(toJson(RESULT));
  assert.deepEqual(json.functions.map((f: { name: string }) => f.name), ["deflate<&>", "crc32", "setjmp", "inflate"]);
  assert.deepEqual(json.functions[1], {
    library: "libz.so.1", name: "crc32", address: "0x1000", calls: 10, timed: 10, totalNs: 3000, meanNs: 300,
    share: 3000 / 1003000, timing: true,
  });
  assert.equal(json.refused[0].code, "FUNCTION_TOO_SHORT");
});

/**
 * Checks that `svg` is well-formed XML as far as an SVG chart needs: one root `svg` element in the
 * SVG namespace, every tag closed in order, attributes quoted, only the five XML entities.
 */
function assertWellFormedSvg(svg: string): void {
  const body = svg.replace(/^<\?xml [^?]*\?>\s*/, "");
  const stack: string[] = [];
  const tag = /<(\/?)([A-Za-z][\w:-]*)((?:\s+[\w:-]+="[^"<]*")*)\s*(\/?)>/y;
  let at = 0, roots = 0;
  while (at < body.length) {
    const lt = body.indexOf("<", at);
    const text = body.slice(at, lt < 0 ? body.length : lt);
    assert.ok(!/&(?!(amp|lt|gt|quot|apos);)/.test(text) && !text.includes(">"), `bad text: ${text}`);
    if (lt < 0) break;
    tag.lastIndex = lt;
    const m = tag.exec(body);
    assert.ok(m, `malformed tag at ${body.slice(lt, lt + 40)}`);
    const [, closing, name, , selfClosing] = m!;
    if (closing) assert.equal(stack.pop(), name, `</${name}> closes what was open`);
    else if (!selfClosing) {
      if (stack.length === 0) roots++;
      stack.push(name);
    } else if (stack.length === 0) roots++;
    at = tag.lastIndex;
  }
  assert.deepEqual(stack, [], "every element closed");
  assert.equal(roots, 1, "one root element");
  assert.match(body, /^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg" /);
}

test("trace report: the SVG is well-formed, one bar per called function, names escaped", () => {
  const svg = toSvg(RESULT);
  assertWellFormedSvg(svg);
  assert.equal(svg.match(/<rect /g)!.length, 1 + 3, "the background and three bars");
  assert.ok(svg.includes("libz.so.1:deflate&lt;&amp;&gt;"));
  const many: TraceResult = {
    ...RESULT,
    functions: Array.from({ length: 40 }, (_, i) => ({ ...RESULT.functions[0], name: `f${i}`, totalNs: i + 1 })),
  };
  assert.equal(toSvg(many).match(/<rect /g)!.length, 1 + 30, "the top 30 only");
});

const cli = new URL("../src/trace/cli.ts", import.meta.url).pathname;
/** How this runtime runs the trace command. */
const runtimeArgs = runtimeName === "deno"
  ? ["run", "-A", "--no-check", cli]
  : runtimeName === "node"
  ? ["--no-warnings", "--experimental-ffi", cli]
  : [cli];
const env = { ...process.env, NO_COLOR: "1" };

/** Runs the trace command in a child process of this runtime: exit status, stdout, stderr. */
function traceCommand(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const result = spawnSync(runtimePath, [...runtimeArgs, ...args], { encoding: "utf8", env });
  return { status: result.status, stdout: result.stdout, stderr: result.stderr };
}

const script = new URL("./fixtures/trace_target.ts", import.meta.url).pathname;

test("the trace command on a script calling atoi N times: at least N calls in its JSON, a table, an SVG", () => {
  const dir = mkdtempSync(join(tmpdir(), "redefine-trace-"));
  try {
    const json = join(dir, "trace.json"), svg = join(dir, "trace.svg");
    const n = 250;
    const { status, stdout, stderr } = traceCommand([
      "--library", "libc.so.6", "--match", "atoi,strto?,dlsym", "--json", json, "--svg", svg, "--", script, String(n), "--x",
    ]);
    assert.equal(status, 0, stderr);
    assert.match(stdout, new RegExp(`sum ${7 * n + 255}; args \\["${n}","--x"\\]`), "the script ran with its own arguments");
    const result = JSON.parse(readFileSync(json, "utf8"));
    const traced = (name: string) => result.functions.find((f: { name: string }) => f.name === name);
    assert.ok(traced("atoi").calls >= n, `atoi: ${traced("atoi").calls} calls`);
    assert.ok(traced("strtol").calls >= n + 1, `strtol (atoi calls it): ${traced("strtol").calls} calls`);
    assert.ok(traced("atoi").totalNs > 0, "atoi timed");
    // dlsym reads its return address to learn who called: counted, never timed.
    assert.deepEqual([traced("dlsym").timing, traced("dlsym").timed], [false, 0]);
    assert.equal(result.runtime, runtimeName);
    assert.match(stderr, /^function\s+calls\s+total\s+mean\s+share$/m);
    assert.match(stderr, /^libc\.so\.6:atoi\s+\d[\d,]*\s/m);
    assertWellFormedSvg(readFileSync(svg, "utf8"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the trace command lists what it cannot trace with the reason, logs signature calls, and never crashes", () => {
  const dir = mkdtempSync(join(tmpdir(), "redefine-trace-"));
  const json = join(dir, "trace.json");
  const { status, stdout, stderr } = traceCommand([
    "--library", "libc.so.6", "--match", "atoi,sem_destroy", "--library", "libredefine-missing.so.9",
    "--signature", "strtol(pointer,pointer,i32):i64", "--signature", "redefine_no_such_function()",
    "--count-only", "--json", json, "--", script, "2",
  ]);
  assert.equal(status, 0, stderr);
  assert.match(stdout, /sum 269;/);
  // glibc's sem_destroy is 3 bytes on x86-64 (xor eax, eax; ret), short of a 5-byte jump.
  if (machine().arch.name === "x86_64") assert.match(stderr, /libc\.so\.6:sem_destroy: FUNCTION_TOO_SHORT: /);
  assert.match(stderr, /libredefine-missing\.so\.9:\*: LIBRARY_NOT_FOUND: /);
  assert.match(stderr, /:redefine_no_such_function: SYMBOL_NOT_FOUND: /);
  assert.equal(stderr.match(/^strtol\(0x[0-9a-f]+, 0x0, 10\) = 7$/gm)?.length, 2, "atoi's two calls logged");
  assert.match(stderr, /^strtol\(0x[0-9a-f]+, 0x0, 16\) = 255$/m);
  const result = JSON.parse(readFileSync(json, "utf8"));
  const atoi = result.functions.find((f: { name: string }) => f.name === "atoi");
  const seen = [atoi.calls, atoi.timed, atoi.timing, result.ticksPerNs];
  assert.deepEqual(seen, [2, 0, false, null], "--count-only: counted, not timed");
  rmSync(dir, { recursive: true, force: true });
});

test("the trace command: a bad command line exits 2 with the usage, --help exits 0", () => {
  const bad = traceCommand(["--library", "libc.so.6"]);
  assert.equal(bad.status, 2);
  assert.match(bad.stderr, /no script to run[\s\S]*usage: redefine-trace/);
  const help = traceCommand(["--help"]);
  assert.equal(help.status, 0);
  assert.match(help.stdout, /--signature SIG/);
});

/** Why libz cannot be used here, or undefined when it is loadable. */
function withoutLibz(): string | undefined {
  try {
    machine().platform.os.symbolAddress("crc32", "libz.so.1");
    return undefined;
  } catch {
    return "libz.so.1 is not installed";
  }
}

test("the trace command on examples/trace_zlib.ts: zlib's functions, and with --callers only libz's calls of libc", () => {
  const example = new URL("../examples/trace_zlib.ts", import.meta.url).pathname;
  const dir = mkdtempSync(join(tmpdir(), "redefine-trace-"));
  try {
    const json = join(dir, "trace.json");
    const zlib = traceCommand([
      "--library", "libz.so.1", "--match", "crc32*,deflate*,inflate*,compress*", "--json", json, "--", example,
    ]);
    assert.equal(zlib.status, 0, zlib.stderr);
    assert.match(zlib.stdout, /50 buffers, \d+ bytes compressed to \d+ and back, checksums equal/);
    const traced = JSON.parse(readFileSync(json, "utf8")).functions;
    const calls = (name: string) => traced.find((f: { name: string }) => f.name === name)?.calls;
    assert.equal(calls("compress2"), 50);
    assert.ok(calls("crc32") >= 100);
    // Node's executable exports a zlib of its own, which the global scope finds first: libz's
    // compress2 then calls Node's deflate, not its own (find() shows it).
    const ownDeflate = find("deflate").every((d) => d.library === "libz.so.1");
    if (ownDeflate) assert.ok(calls("deflate") >= 50, "compress2 calls deflate");
    else assert.equal(calls("deflate") ?? 0, 0, "libz's deflate is not the one its compress2 reaches");
    const callers = traceCommand([
      "--library", "libc.so.6", "--match", "malloc,free", "--callers", "libz.so.1", "--json", json, "--", example,
    ]);
    assert.equal(callers.status, 0, callers.stderr);
    const fromLibz = JSON.parse(readFileSync(json, "utf8")).functions;
    // zlib allocates its state once per stream: compress2 and uncompress, 50 rounds each — when
    // its calls reach its own code (under Node they reach Node's zlib, which allocates itself).
    for (const name of ["malloc", "free"]) {
      const n = fromLibz.find((f: { name: string }) => f.name === name).calls;
      assert.ok(n < 10_000, `${name} called ${n} times: by libz only, not by the runtime`);
      if (ownDeflate) assert.ok(n >= 100, `${name} called ${n} times by libz`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}, { skip: withoutLibz() });

test("the trace command stopped with Ctrl-C (SIGINT) reports before it exits", async () => {
  const forever = new URL("./fixtures/trace_forever.ts", import.meta.url).pathname;
  const child = spawn(runtimePath, [...runtimeArgs, "--library", "libc.so.6", "--match", "atoi", "--", forever], { env });
  let stdout = "", stderr = "";
  child.stderr.on("data", (chunk) => (stderr += chunk));
  const status = await new Promise<string>((resolve) => {
    child.stdout.on("data", (chunk) => {
      stdout += chunk;
      if (stdout.includes("ready")) child.kill("SIGINT");
    });
    child.on("close", (code, signal) => resolve(`${code} ${signal}`));
  });
  // Deno's node:child_process reports the signal it sent rather than the exit code (its own
  // Deno.Command sees code 130, as a shell does).
  assert.equal(status, runtimeName === "deno" ? "null SIGINT" : "130 null", stderr);
  assert.match(stderr, /^libc\.so\.6:atoi\s+5\s/m);
});
