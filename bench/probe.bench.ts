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
import { locate } from "../src/target.ts";
import { compare as compareRounds, median, report } from "./report.ts";
import type { Case, Row } from "./report.ts";

const { runtime, os } = platform();
const libc = runtime.open("libc.so.6", { labs: { parameters: ["i64"], result: "i64" } });

/** Rounds interleaved as every bench does; the probes' figures are the median round. */
function compare(a: Case, b: Case, n: number): [number, number] {
  return compareRounds(a, b, n, 21, median);
}

const rows: Row[] = [];
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
if (machine().arch.name === "x86_64") {
  const loop = nativeLoop();
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
          const site = locate({ symbol, library: "libc.so.6", parameters: [], result: "void" });
          const patch = apply(site, { kind: "original" });
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
  }
} else {
  console.log(`${runtime.name}: the native-loop rows need x86-64; skipped on ${machine().arch.name}`);
}

/**
 * loop(fn, n, argument): calls fn(argument, NULL, 10) n times from native code (System V), placed
 * in the code pool.
 */
function nativeLoop(): (fn: bigint, n: bigint, argument: bigint) => void {
  const code = Uint8Array.of(
    0x53, //                   push rbx
    0x41, 0x54, //             push r12
    0x41, 0x55, //             push r13: rsp 16-byte aligned for the calls
    0x48, 0x89, 0xfb, //       mov rbx, rdi: fn
    0x49, 0x89, 0xf4, //       mov r12, rsi: n
    0x49, 0x89, 0xd5, //       mov r13, rdx: argument
    0x4c, 0x89, 0xef, //       top: mov rdi, r13
    0x31, 0xf6, //             xor esi, esi: strtol's endptr, NULL
    0xba, 0x0a, 0, 0, 0, //    mov edx, 10: strtol's base
    0xff, 0xd3, //             call rbx
    0x49, 0xff, 0xcc, //       dec r12
    0x75, 0xef, //             jnz top
    0x41, 0x5d, //             pop r13
    0x41, 0x5c, //             pop r12
    0x5b, //                   pop rbx
    0xc3, //                   ret
  );
  const call = runtime.fnPointer(constant(code), { parameters: ["u64", "u64", "u64"], result: "void" });
  return (fn, n, argument) => void call(fn, n, argument);
}

/** Where `bytes` now are in native memory (a slot of the code pool: readable and executable). */
function constant(bytes: Uint8Array): bigint {
  const { pool } = machine();
  const slot = pool.allocate(0n, 2n ** 62n, bytes.length);
  if (!slot) throw new Error("no executable memory for the native loop");
  pool.write(slot, bytes);
  return slot.address;
}

report(rows);
