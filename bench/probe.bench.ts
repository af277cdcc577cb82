/**
 * Benchmarks of the probes, each a ratio against the cheapest thing that does the same job, in the
 * same run, rounds interleaved (the machines are noisy: compare ratios, not nanoseconds). Run by
 * `npm run bench` under the three runtimes, whose combined table gets these rows (`report`).
 */
import { attach, redefine } from "../mod.ts";
import { platform } from "../platform/mod.ts";
import { machine } from "../src/registry.ts";
import { probeNatively } from "../src/trace/native_probe.ts";
import { apply } from "../src/redefine.ts";
import { compare as compareRounds, median, report } from "./report.ts";
import type { Case, Row } from "./report.ts";

const { runtime, os } = platform();
const libc = runtime.open("libc.so.6", {
  labs: { parameters: ["i64"], result: "i64" },
  pthread_create: { parameters: ["buffer", "pointer", "pointer", "buffer"], result: "i32" },
  pthread_join: { parameters: ["u64", "pointer"], result: "i32" },
});

/** Rounds interleaved as every bench does; the probes' figures are the median round. */
function compare(a: Case, b: Case, n: number): [number, number] {
  return compareRounds(a, b, n, 21, median);
}

const rows: Row[] = [];
/** Where the native loop's `top` is in its code (see `nativeLoop`). */
const TOP = 16;
const labs = { symbol: "labs", library: "libc.so.6", parameters: ["i64"], result: "i64" } as const;
const call = () => libc.labs(-5n);

// A JS attach with both callbacks, against a JS replacement that calls the original itself.
{
  let restore = () => {};
  const [ours, baseline] = compare(
    {
      setUp: () => {
        const probe = attach(labs, { onEnter() {}, onLeave() {} });
        restore = () => probe.restore();
      },
      body: call,
      tearDown: () => restore(),
    },
    {
      setUp: () => {
        let original = (x: bigint): bigint => x;
        const patch = redefine(labs, (x) => original(x));
        original = patch.original;
        restore = () => patch.restore();
      },
      body: call,
      tearDown: () => restore(),
    },
    100_000,
  );
  rows.push({ name: "attach / replacement calling original", ours, baseline, unit: "ns", goal: { ratio: 1.1 } });
}

// A native probe called from a native loop, against the same loop calling the function without
// one: what tracing costs the functions the traced program calls. Two functions: labs (a few
// instructions, the worst case) and strtol on a short number (a typical small libc function).
// The loop runs on the JS thread, the probe's owner; one more row per function runs it on another
// thread, whose calls take the atomic add (each round there starts and joins the thread).
if (machine().arch.name === "x86_64") {
  const { loop, onAnotherThread } = nativeLoop();
  const text = constant(new TextEncoder().encode("12345\0"));
  const functions = [
    { symbol: "labs", argument: 2n ** 63n - 5n },
    { symbol: "strtol", argument: text },
  ];
  const n = 200_000n, N = Number(n);
  let restore = () => {};
  for (const { symbol, argument } of functions) {
    const address = os.symbolAddress(symbol, "libc.so.6");
    const body = () => loop(address, n, argument);
    // The floor: the same entry jump and trampoline with nothing in between.
    const [hooked, bare] = compare(
      {
        setUp: () => {
          const patch = apply({ symbol, library: "libc.so.6", parameters: [], result: "void" }, { kind: "original" });
          restore = () => patch.restore();
        },
        body,
        tearDown: () => restore(),
      },
      { body },
      1,
    );
    rows.push({
      name: `entry jump + trampoline only, ${symbol}`,
      ours: hooked / N,
      baseline: bare / N,
      unit: "ns",
      goal: {},
    });
    for (const timing of [false, true]) {
      const [ours, baseline] = compare(
        {
          setUp: () => {
            const probe = probeNatively({ symbol, library: "libc.so.6" }, timing);
            restore = () => probe.restore();
          },
          body,
          tearDown: () => restore(),
        },
        { body },
        1,
      );
      rows.push({
        name: `native ${timing ? "timing" : "counting"} probe, ${symbol}, native loop`,
        ours: ours / N,
        baseline: baseline / N,
        unit: "ns",
        goal: timing ? {} : { ratio: 1.2 },
      });
    }
    const threadCalls = 25n * n;
    const onThread = () => onAnotherThread(address, threadCalls, argument);
    const [ours, baseline] = compare(
      {
        setUp: () => {
          const probe = probeNatively({ symbol, library: "libc.so.6" }, false);
          restore = () => probe.restore();
        },
        body: onThread,
        tearDown: () => restore(),
      },
      { body: onThread },
      1,
    );
    rows.push({
      name: `native counting probe, ${symbol}, another thread's loop`,
      ours: ours / Number(threadCalls),
      baseline: baseline / Number(threadCalls),
      unit: "ns",
      goal: {},
    });
  }
} else {
  console.log(`${runtime.name}: the native-loop rows need x86-64; skipped on ${machine().arch.name}`);
}

/**
 * loop(record): calls record[0](record[2], NULL, 10) record[1] times from native code (System V),
 * placed in the code pool; returns 0, so that it also serves as a thread's start routine. Run on
 * this thread (through the FFI) or on a new one.
 */
function nativeLoop(): {
  loop: (fn: bigint, n: bigint, argument: bigint) => void;
  onAnotherThread: (fn: bigint, n: bigint, argument: bigint) => void;
} {
  const code = Uint8Array.of(
    0x53, //                   push rbx
    0x41, 0x54, //             push r12
    0x41, 0x55, //             push r13: rsp 16-byte aligned for the calls
    0x48, 0x8b, 0x1f, //       mov rbx, [rdi]: fn
    0x4c, 0x8b, 0x67, 0x08, // mov r12, [rdi+8]: n
    0x4c, 0x8b, 0x6f, 0x10, // mov r13, [rdi+16]: argument
    0x4c, 0x89, 0xef, //       top (TOP): mov rdi, r13
    0x31, 0xf6, //             xor esi, esi: strtol's endptr, NULL
    0xba, 0x0a, 0, 0, 0, //    mov edx, 10: strtol's base
    0xff, 0xd3, //             call rbx
    0x49, 0xff, 0xcc, //       dec r12
    0x75, 0xef, //             jnz top
    0x41, 0x5d, //             pop r13
    0x41, 0x5c, //             pop r12
    0x5b, //                   pop rbx
    0x31, 0xc0, //             xor eax, eax
    0xc3, //                   ret
  );
  const address = constant(code, TOP);
  const call = runtime.fnPointer(address, { parameters: ["buffer"], result: "u64" });
  const record = (fn: bigint, n: bigint, argument: bigint) => new Uint8Array(new BigUint64Array([fn, n, argument]).buffer);
  const id = new BigUint64Array(1);
  return {
    loop: (fn, n, argument) => void call(record(fn, n, argument)),
    onAnotherThread(fn, n, argument) {
      const r = record(fn, n, argument);
      if (libc.pthread_create(new Uint8Array(id.buffer), 0n, address, r) !== 0) throw new Error("pthread_create failed");
      libc.pthread_join(id[0]!, 0n);
    },
  };
}

/**
 * Where `bytes` now are in native memory (a slot of the code pool: readable and executable), placed
 * so that byte `line` of them starts a 64-byte line: the loop's speed depends on where it lies
 * (fetch blocks), and each runtime's pool would put it elsewhere.
 */
function constant(bytes: Uint8Array, line = 0): bigint {
  const { pool } = machine();
  const slot = pool.allocate(0n, 2n ** 62n, bytes.length + 64);
  if (!slot) throw new Error("no executable memory for the native loop");
  const pad = Number((64n - (slot.address + BigInt(line)) % 64n) % 64n);
  const padded = new Uint8Array(pad + bytes.length).fill(0xcc); // int3 before the code
  padded.set(bytes, pad);
  pool.write(slot, padded);
  return slot.address + BigInt(pad);
}

report(rows);
