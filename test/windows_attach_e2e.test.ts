/**
 * Probes on Windows x64, for real (run under Wine by `npm run test:windows`; registers nothing on
 * other systems). `attach()` on msvcrt's `strtol` and `labs` and kernel32's `GetCurrentProcessId`
 * (an import thunk into kernelbase): the callbacks see the arguments, one array per call, and
 * replace the result, for calls from JS and from native code on the JS thread, while other threads
 * and re-entrant calls reach the original unseen. The native probe (what the trace command puts in
 * front of every function) counts and times calls through the FFI, from a native loop, and from
 * two threads at once, with nothing lost, and times a call that faults and handles the fault
 * itself (SEH). Both also in msvcrt's import slot of kernel32's clock (`callers`). Every entry and
 * slot comes back to its exact bytes and protection. Then the trace command itself on a script
 * calling msvcrt N times: a few functions, with `--callers`, and every export of msvcrt and
 * kernel32.
 */
import { assert, runtimeName, runtimePath, test } from "./harness.ts";
import { attach, imports } from "../mod.ts";
import { clockRate, probeNatively } from "../src/trace/native_probe.ts";
import type { NativeProbe } from "../src/trace/native_probe.ts";
import { PROBE_RECORD } from "../src/arch/probe.ts";
import { platform } from "../platform/mod.ts";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { onWindows, win32 } from "./windows_native.ts";

// hammer(record), Windows x64: calls record.fn(-5) record.n times, the sum of its (i32) results
// into record.sum. record: fn +0, n +8, sum +16.
const HAMMER = [
  0x53, //                         push rbx
  0x56, //                         push rsi
  0x57, //                         push rdi: rsp 16-aligned again
  0x48, 0x83, 0xec, 0x20, //       sub rsp, 32: the callee's shadow space
  0x48, 0x89, 0xcb, //             mov rbx, rcx: the record
  0x48, 0x8b, 0x73, 0x08, //       mov rsi, [rbx+8]: n
  0x31, 0xff, //                   xor edi, edi: the sum
  0xb9, 0xfb, 0xff, 0xff, 0xff, // top: mov ecx, -5
  0xff, 0x13, //                   call [rbx]
  0x48, 0x63, 0xc0, //             movsxd rax, eax
  0x48, 0x01, 0xc7, //             add rdi, rax
  0x48, 0xff, 0xce, //             dec rsi
  0x75, 0xee, //                   jnz top
  0x48, 0x89, 0x7b, 0x10, //       mov [rbx+16], rdi
  0x31, 0xc0, //                   xor eax, eax
  0x48, 0x83, 0xc4, 0x20, //       add rsp, 32
  0x5f, //                         pop rdi
  0x5e, //                         pop rsi
  0x5b, //                         pop rbx
  0xc3, //                         ret
];

if (onWindows) {
  const { runtime, os } = platform();
  const msvcrt = runtime.open("msvcrt.dll", {
    labs: { parameters: ["i32"], result: "i32" },
    strtol: { parameters: ["buffer", "pointer", "i32"], result: "i32" },
    time: { parameters: ["pointer"], result: "i64" },
  });
  const kernel32 = runtime.open("kernel32.dll", {
    GetCurrentProcessId: { parameters: [], result: "u32" },
    GetSystemTimeAsFileTime: { parameters: ["buffer"], result: "void" },
    IsBadReadPtr: { parameters: ["usize", "usize"], result: "i32" },
  });
  const { procAddress, onAnotherThread, onThreads, assemble, allocate } = win32();
  const realPid = kernel32.GetCurrentProcessId() as number;
  const cstr = (text: string) => new TextEncoder().encode(text + "\0");

  const STRTOL = { symbol: "strtol", library: "msvcrt.dll", parameters: ["pointer", "pointer", "i32"], result: "i32" } as const;
  const LABS = { symbol: "labs", library: "msvcrt.dll", parameters: ["i32"], result: "i32" } as const;
  const PID = { symbol: "GetCurrentProcessId", library: "kernel32.dll", parameters: [], result: "u32" } as const;
  /** kernel32's clock as msvcrt's `time` reads it: once per call, through msvcrt's import slot. */
  const TIME = { symbol: "GetSystemTimeAsFileTime", library: "kernel32.dll", callers: "msvcrt.dll" } as const;
  const timeSlot = () => imports("msvcrt.dll").find((i) => i.name === TIME.symbol)!.slot;
  const realTime = (seconds: unknown) => typeof seconds === "bigint" && seconds > 1_700_000_000n;

  /** Runs `body`; the bytes and the page protection at `address` must come back exactly. */
  const restoresExactly = (address: bigint, body: () => void): void => {
    const bytes = runtime.view(address, 32).slice();
    const protection = os.mappingAt(address)!.protection;
    body();
    assert.deepEqual(runtime.view(address, 32).slice(), bytes, "code bytes restored exactly");
    assert.equal(os.mappingAt(address)!.protection, protection, "page protection restored exactly");
  };

  /**
   * Runs `body` with a native probe on `target` (timing or not), restored after, whatever `body`
   * does; the bytes and page protection where it writes (the entry, or with `callers` the import
   * slot) must come back exactly.
   */
  const withProbe = (
    target: { readonly symbol: string; readonly library: string; readonly callers?: string },
    timing: boolean,
    body: (probe: NativeProbe) => void,
  ): void => {
    const at = target.callers === undefined
      ? os.symbolAddress(target.symbol, target.library)
      : imports(target.callers).find((i) => i.name === target.symbol)!.slot;
    restoresExactly(at, () => {
      const probe = probeNatively(target, timing);
      try {
        body(probe);
      } finally {
        probe.restore();
      }
    });
  };

  /**
   * Runs HAMMER once per entry of `runs`, that many calls of `fn` each: one after another on this
   * thread, or each on a thread of its own, all at once, `meanwhile` running here. Each run's sum
   * of results.
   */
  const hammer = (fn: bigint, runs: readonly bigint[], where: "here" | "threads", meanwhile?: () => void): bigint[] => {
    const code = assemble(HAMMER);
    const records = runs.map((n) => {
      const memory = allocate(24);
      const view = runtime.view(memory.address, 24);
      const words = new BigUint64Array(view.buffer, view.byteOffset, 3);
      words.set([fn, n, 0n]);
      return { memory, words };
    });
    try {
      if (where === "threads") onThreads(code.address, records.map((r) => r.memory.address), meanwhile);
      else {
        const loop = runtime.fnPointer(code.address, { parameters: ["usize"], result: "u32" });
        for (const r of records) assert.equal(loop(r.memory.address), 0);
      }
      return records.map((r) => r.words[2]);
    } finally {
      for (const r of records) r.memory.release();
      code.release();
    }
  };

  /**
   * A native probe's two counters, read live: the owner's (the JS thread that attached, told
   * apart by gs:[0x30] as the guard does) and the shared one every other thread adds to.
   */
  const counters = (probe: NativeProbe): { own(): number; shared(): number } => {
    const view = runtime.view(probe.patch.counterAddress!, PROBE_RECORD.size);
    const record = new BigUint64Array(view.buffer, view.byteOffset, PROBE_RECORD.size / 8);
    return {
      own: () => Number(Atomics.load(record, PROBE_RECORD.ownCalls / 8)),
      shared: () => Number(Atomics.load(record, PROBE_RECORD.calls / 8)),
    };
  };

  test("windows attach on msvcrt strtol: onEnter sees the arguments, onLeave replaces the result, one args array per call", () => {
    const address = os.symbolAddress("strtol", "msvcrt.dll");
    const entered: unknown[][] = [];
    const left: [number, unknown[]][] = [];
    restoresExactly(address, () => {
      using probe = attach(STRTOL, {
        onEnter(args) {
          entered.push(args);
        },
        onLeave(result, args) {
          left.push([result, args]);
          return result * 2;
        },
      });
      assert.equal(probe.patch.address, address);
      assert.equal(msvcrt.strtol(cstr("21"), 0n, 10), 42);
      assert.equal(msvcrt.strtol(cstr("-4"), 0n, 10), -8);
      assert.equal(probe.calls, 2);
      assert.equal(probe.active, true);
    });
    assert.equal(entered.length, 2);
    assert.equal(typeof entered[0][0], "bigint", "the text as an address");
    assert.equal(runtime.cString(entered[0][0] as bigint), "21", "the address of the caller's text");
    assert.deepEqual(entered[0].slice(1), [0n, 10], "endptr NULL, base 10");
    assert.deepEqual(left.map(([result]) => result), [21, -4], "onLeave gets the original's result");
    assert.ok(left[0][1] === entered[0] && left[1][1] === entered[1], "the same args array in onEnter and onLeave");
    assert.equal(msvcrt.strtol(cstr("21"), 0n, 10), 21, "restored at the end of the scope");
  });

  test("windows attach: onEnter changes an argument before the original sees it; no onLeave keeps the result", () => {
    {
      using probe = attach(STRTOL, {
        onEnter(args) {
          args[2] = 16;
        },
      });
      assert.equal(msvcrt.strtol(cstr("ff"), 0n, 10), 255);
      assert.equal(probe.calls, 1);
    }
    using probe = attach(STRTOL, { onLeave: () => undefined });
    assert.equal(msvcrt.strtol(cstr("77"), 0n, 10), 77);
    assert.equal(probe.calls, 1);
  });

  test("windows attach on msvcrt labs: a native loop's calls on the JS thread are probed, each replaced", () => {
    const address = os.symbolAddress("labs", "msvcrt.dll");
    const seen: number[] = [];
    restoresExactly(address, () => {
      using probe = attach(LABS, {
        onEnter(args) {
          seen.push(args[0]);
        },
        onLeave: (result) => result + 1,
      });
      assert.deepEqual(hammer(address, [100n], "here"), [600n], "labs(-5) + 1, 100 times");
      assert.equal(probe.calls, 100);
      assert.equal(msvcrt.labs(-3), 4, "and a call from JS");
      assert.equal(probe.calls, 101);
    });
    assert.equal(seen.length, 101);
    assert.ok(seen.slice(0, 100).every((x) => x === -5), "the loop's argument");
    assert.deepEqual(hammer(address, [100n], "here"), [500n], "restored: the real labs");
  });

  test("windows attach on kernel32 GetCurrentProcessId (a thunk): other threads and re-entrant calls reach the original unseen", () => {
    const address = os.symbolAddress("GetCurrentProcessId", "kernel32.dll");
    const inner: number[] = [];
    restoresExactly(address, () => {
      using probe = attach(PID, {
        onEnter(args) {
          assert.equal(args.length, 0);
          inner.push(kernel32.GetCurrentProcessId() as number);
        },
        onLeave: () => 4242,
      });
      assert.equal(probe.patch.address, address, "the function kernel32's export leads to");
      assert.equal(kernel32.GetCurrentProcessId(), 4242);
      assert.equal(onAnotherThread(procAddress("kernel32.dll", "GetCurrentProcessId")), realPid, "another thread: the original");
      assert.equal(probe.calls, 1, "neither the other thread's call nor the re-entrant one is counted");
    });
    assert.deepEqual(inner, [realPid], "the call inside onEnter ran the original");
    assert.equal(kernel32.GetCurrentProcessId(), realPid);
  });

  test("windows native probe on msvcrt labs: every FFI call counted, and timed when timing; results untouched; bytes restored", () => {
    const address = os.symbolAddress("labs", "msvcrt.dll");
    for (const timing of [false, true]) {
      restoresExactly(address, () => {
        const probe = probeNatively({ symbol: "labs", library: "msvcrt.dll" }, timing);
        let sum = 0;
        for (let i = 1; i <= 500; i++) sum += msvcrt.labs(-i) as number;
        assert.equal(sum, (500 * 501) / 2, "labs' results pass through");
        const reading = probe.read();
        const { calls, timed, ticks } = reading;
        assert.deepEqual({ calls, timed, ticked: ticks > 0n }, { calls: 500, timed: timing ? 500 : 0, ticked: timing });
        probe.restore();
        assert.deepEqual(probe.read(), reading, "the last reading stays after restore");
      });
    }
  });

  test("windows native probe: two threads' native loops while the JS thread calls too: no call lost, the owner's on its own counter", () => {
    const address = os.symbolAddress("labs", "msvcrt.dll");
    const n = 1_000_000n;
    for (const timing of [false, true]) {
      withProbe({ symbol: "labs", library: "msvcrt.dll" }, timing, (probe) => {
        const { own, shared } = counters(probe);
        assert.deepEqual(hammer(address, [1000n], "here"), [5000n], "a native loop on the JS thread");
        assert.deepEqual([own(), shared(), probe.read().timed], [1000, 0, timing ? 1000 : 0]);
        // The JS thread calls all the while the two threads do (bounded, should they never count).
        let fromJs = 0, sum = 0;
        const until = performance.now() + 30_000;
        const sums = hammer(address, [n, n], "threads", () => {
          do {
            for (let i = 0; i < 1000; i++) sum += msvcrt.labs(-7) as number;
            fromJs += 1000;
          } while (shared() < 2 * Number(n) && performance.now() < until);
        });
        assert.deepEqual(sums, [5n * n, 5n * n], "each thread got labs(-5) = 5 every time");
        assert.equal(sum, 7 * fromJs, "the JS thread got labs(-7) = 7 every time");
        assert.deepEqual([own(), shared()], [1000 + fromJs, 2 * Number(n)], "the JS thread's calls on the owner's counter, the threads' on the shared one");
        const { calls, timed } = probe.read();
        assert.equal(calls, 1000 + fromJs + 2 * Number(n), "no call lost");
        if (timing) assert.ok(timed >= 1000 && timed <= calls, `${timed} timed`);
        else assert.equal(timed, 0);
      });
    }
  });

  test("windows native probe on kernel32 GetCurrentProcessId: counted through the thunk, from JS and from another thread", () => {
    withProbe({ symbol: "GetCurrentProcessId", library: "kernel32.dll" }, true, (probe) => {
      for (let i = 0; i < 50; i++) assert.equal(kernel32.GetCurrentProcessId(), realPid);
      assert.equal(onAnotherThread(procAddress("kernel32.dll", "GetCurrentProcessId")), realPid);
      assert.deepEqual([probe.read().calls, probe.read().timed], [51, 51]);
      const { own, shared } = counters(probe);
      assert.deepEqual([own(), shared()], [50, 1], "the JS thread's on the owner's counter, the other thread's shared");
    });
  });

  test("windows attach with callers: msvcrt's calls through its import slot are probed, the program's own are not", () => {
    const seen: bigint[] = [];
    restoresExactly(timeSlot(), () => {
      using probe = attach({ ...TIME, parameters: ["pointer"], result: "void" }, {
        onEnter(args) {
          seen.push(args[0]);
        },
      });
      assert.equal(probe.patch.patchedAddress, timeSlot());
      assert.ok(realTime(msvcrt.time(0n)), "msvcrt's time, on the real clock");
      kernel32.GetSystemTimeAsFileTime(new Uint8Array(8));
      assert.equal(probe.calls, 1, "msvcrt's call only");
    });
    assert.equal(seen.length, 1);
    assert.notEqual(seen[0], 0n, "msvcrt's FILETIME, by address");
  });

  test("windows native probe with callers: counts and times only msvcrt's calls, in its import slot", () => {
    withProbe(TIME, true, (probe) => {
      for (let i = 0; i < 20; i++) {
        assert.ok(realTime(msvcrt.time(0n)));
        kernel32.GetSystemTimeAsFileTime(new Uint8Array(8));
      }
      assert.deepEqual([probe.read().calls, probe.read().timed], [20, 20], "the program's own calls are not counted");
      assert.equal(counters(probe).own(), 20, "the JS thread's, on the owner's counter");
    });
  });

  test("windows timing probe on kernel32 IsBadReadPtr: a fault raised and handled inside the timed call (SEH) returns through the probe", () => {
    withProbe({ symbol: "IsBadReadPtr", library: "kernel32.dll" }, true, (probe) => {
      assert.equal(kernel32.IsBadReadPtr(0x10n, 8n), 1, "the read faulted; IsBadReadPtr's own handler caught it");
      const page = allocate(4096);
      try {
        assert.equal(kernel32.IsBadReadPtr(page.address, 8n), 0);
      } finally {
        page.release();
      }
      assert.deepEqual([probe.read().calls, probe.read().timed], [2, 2]);
    });
  });

  test("windows clockRate: the timestamp counter ticks at a plausible rate (10 MHz to 10 GHz)", () => {
    const rate = clockRate(10);
    assert.ok(rate > 0.01 && rate < 10, `${rate} ticks per ns`);
  });

  const cli = fileURLToPath(new URL("../src/trace/cli.ts", import.meta.url));
  const script = fileURLToPath(new URL("./fixtures/trace_windows_target.ts", import.meta.url));
  const N = 250;
  /** What the trace command's JSON says of a function. */
  interface TracedFunction {
    name: string;
    calls: number;
    timed: number;
    totalNs: number;
    timing: boolean;
  }

  /** What the trace command could not trace, and why. */
  interface Refused {
    library: string;
    name: string;
    code: string;
    reason: string;
  }
  /** What one run of the trace command left. */
  interface TraceRun {
    functions: TracedFunction[];
    refused: Refused[];
    traced(name: string): TracedFunction;
    stderr: string;
    svg: string;
  }

  /**
   * The trace command, in a child process of this runtime started in a new directory, on the
   * script calling msvcrt N times: the functions of its JSON (`--json trace.json`, a path relative
   * to that directory), its standard error, and the chart of `--svg trace.svg`.
   */
  const traceCommand = (options: string[]): TraceRun => {
    const dir = mkdtempSync(join(tmpdir(), "redefine-trace-"));
    try {
      const args = [...options, "--json", "trace.json", "--svg", "trace.svg", "--", script, String(N)];
      const run = spawnSync(runtimePath, [...(runtimeName === "deno" ? ["run", "-A", "--no-check"] : []), cli, ...args], {
        cwd: dir,
        encoding: "utf8",
        env: { ...process.env, NO_COLOR: "1" },
      });
      assert.equal(run.status, 0, `${run.error ?? ""}\n${run.stdout}\n${run.stderr}`);
      assert.match(run.stdout, new RegExp(`sum ${7 * N + 255}; args \\["${N}"\\]`), "the script ran with its own arguments");
      const result = JSON.parse(readFileSync(join(dir, "trace.json"), "utf8"));
      assert.equal(result.runtime, runtimeName);
      const { functions, refused }: { functions: TracedFunction[]; refused: Refused[] } = result;
      const svg = readFileSync(join(dir, "trace.svg"), "utf8");
      return { functions, refused, traced: (name) => functions.find((f) => f.name === name)!, stderr: run.stderr, svg };
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  };

  test("windows trace command on a script calling msvcrt labs N times: at least N calls in its JSON, timed, the table, a signature's log", () => {
    const { traced, stderr, svg } = traceCommand([
      "--library", "msvcrt.dll", "--match", "labs,strtol", "--signature", "strtol(pointer,pointer,i32):i32",
    ]);
    const chart = /^<\?xml [^]*<svg [^]*msvcrt\.dll:labs[^]*<\/svg>\s*$/;
    assert.match(svg, chart, "the chart, where --svg said, relative to the command's directory");
    assert.ok(traced("labs").calls >= N, `labs: ${traced("labs").calls} calls`);
    assert.ok(traced("labs").timed >= N && traced("labs").totalNs > 0, "labs timed");
    assert.ok(traced("strtol").calls >= 1, `strtol: ${traced("strtol").calls} calls`);
    assert.match(stderr, /^function\s+calls\s+total\s+mean\s+share$/m);
    assert.match(stderr, /^msvcrt\.dll:labs\s+\d[\d,]*\s/m);
    assert.match(stderr, /^strtol\(0x[0-9a-f]+, 0x0, 16\) = 255$/m, "the signature's call logged");
  });

  test("windows trace command with --callers msvcrt.dll: kernel32's clock as msvcrt calls it, not the script's own calls", () => {
    const { traced } = traceCommand([
      "--library", "kernel32.dll", "--match", TIME.symbol, "--callers", TIME.callers, "--count-only",
    ]);
    const calls = traced(TIME.symbol).calls;
    assert.ok(calls >= N && calls < 2 * N, `${calls} calls: msvcrt's time's, not the script's own ${N}`);
    assert.deepEqual([traced(TIME.symbol).timed, traced(TIME.symbol).timing], [0, false], "--count-only");
  });

  test("windows trace command on every export of msvcrt and kernel32, the runtime's own calls on its threads too: no crash, refusals listed", () => {
    const { functions, refused, traced, stderr } = traceCommand(["--library", "msvcrt.dll", "--library", "kernel32.dll"]);
    assert.ok(functions.length > 1000, `${functions.length} functions traced`);
    assert.ok(traced("labs").calls >= N);
    assert.ok(traced(TIME.symbol).calls >= 2 * N, "the script's own calls and msvcrt's time's");
    if (refused.length) assert.ok(stderr.includes(`not traced (${refused.length}):`));
    for (const r of refused) {
      assert.ok(r.code !== "" && r.reason !== "", `${r.library}:${r.name}`);
      assert.ok(stderr.includes(`  ${r.library}:${r.name}: ${r.code}: `), `${r.library}:${r.name} listed with its reason`);
    }
  });
}
