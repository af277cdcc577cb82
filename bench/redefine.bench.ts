/**
 * Benchmarks of the core, each a ratio against the cheapest thing that does the same job, measured
 * in the same run (the machines are noisy: compare ratios, not nanoseconds). Run by `npm run bench`
 * under both runtimes.
 */
import { redefine } from "../mod.ts";
import { platform } from "../platform/mod.ts";
import { writeCode } from "../src/code_memory.ts";
import { jmpAbs } from "../src/arch/x86_64/writer.ts";

const { runtime, os } = platform();
const libc = runtime.open("libc.so.6", { labs: { parameters: ["i64"], result: "i64" } });

/** Nanoseconds per call of `body`, best of `rounds` rounds of `n` calls. */
function timePer(body: () => void, n: number): number {
  const start = performance.now();
  for (let i = 0; i < n; i++) body();
  return ((performance.now() - start) * 1e6) / n;
}

/** A measured body with untimed set-up and tear-down around each round. */
interface Case {
  body: () => void;
  setUp?: () => void;
  tearDown?: () => void;
}

/** Interleaves rounds of `a` and `b` so drift hits both alike; returns the medians in ns. */
function compare(a: Case, b: Case, n: number, rounds = 15): [number, number] {
  const as: number[] = [], bs: number[] = [];
  for (let r = 0; r < rounds; r++) {
    for (const [c, out] of [[a, as], [b, bs]] as const) {
      c.setUp?.();
      out.push(timePer(c.body, n));
      c.tearDown?.();
    }
  }
  const median = (xs: number[]) => xs.sort((x, y) => x - y)[Math.floor(xs.length / 2)];
  return [median(as), median(bs)];
}

export interface Row {
  name: string;
  ours: number;
  baseline: number;
  unit: string;
  goal: number;
}

const rows: Row[] = [];

// (a) A call of a function redefined to a JS function, against the minimal hook: the same function
// with a bare absolute jump at its entry straight to a bare runtime callback.
{
  const labs = os.symbolAddress("labs");
  const signature = { parameters: ["i64"], result: "i64" } as const;
  const identity = (x: bigint) => x;
  const bare = runtime.callback(signature, identity);
  const original = runtime.view(labs, 14).slice();
  const call = () => libc.labs(-5n);
  let patch: { restore(): void } | undefined;
  const minimal = () => writeCode(platform(), [{ address: labs, bytes: jmpAbs(bare.address) }]);
  const unhook = () => writeCode(platform(), [{ address: labs, bytes: original }]);
  const [ours, baseline] = compare(
    {
      setUp: () => (patch = redefine({ symbol: "labs", ...signature }, identity)),
      body: call,
      tearDown: () => patch!.restore(),
    },
    { setUp: minimal, body: call, tearDown: unhook },
    100_000,
  );
  bare.close();
  rows.push({ name: "call through a JS replacement", ours, baseline, unit: "ns/call", goal: 1.05 });
}

// (c) original(...) from JS, against a direct FFI call of the same function before it was patched.
{
  const signature = { parameters: ["i64"], result: "i64" } as const;
  let patch: ReturnType<typeof redefine<typeof signature.parameters, "i64">> | undefined;
  let original: (x: bigint) => bigint = () => 0n;
  let sink = 0n;
  const [ours, baseline] = compare(
    {
      setUp: () => {
        patch = redefine({ symbol: "labs", ...signature }, (x) => x);
        original = patch.original;
      },
      body: () => (sink += original(-5n)),
      tearDown: () => patch!.restore(),
    },
    { body: () => (sink += libc.labs(-5n) as bigint) },
    1_000_000,
    9,
  );
  if (sink === 0n) throw new Error("unreachable");
  rows.push({ name: "original() vs direct call, unpatched", ours, baseline, unit: "ns/call", goal: 1.2 });
}

// (b) One redefine + restore, against the two mprotect pairs it needs, on the same page.
{
  const getppid = os.symbolAddress("getppid");
  const getpid = os.symbolAddress("getpid");
  const page = getppid - getppid % BigInt(os.pageSize);
  const protection = os.mappingAt(page)!.protection;
  const [ours, baseline] = compare(
    { body: () => redefine({ symbol: "getppid", parameters: [], result: "i32" }, getpid).restore() },
    {
      body: () => {
        os.protect(page, os.pageSize, protection | 2);
        os.protect(page, os.pageSize, protection);
        os.protect(page, os.pageSize, protection | 2);
        os.protect(page, os.pageSize, protection);
      },
    },
    200,
  );
  rows.push({ name: "redefine + restore / 2 mprotect pairs", ours: ours / 1000, baseline: baseline / 1000, unit: "µs", goal: 1.5 });

  // The same pairs with the two 5-byte writes between them: writing makes the kernel copy the page
  // and flush TLBs when write permission goes, a cost any patcher pays.
  const jump = runtime.view(getppid, 5).slice();
  const [ours2, withWrites] = compare(
    { body: () => redefine({ symbol: "getppid", parameters: [], result: "i32" }, getpid).restore() },
    {
      body: () => {
        for (let k = 0; k < 2; k++) {
          os.protect(page, os.pageSize, protection | 2);
          runtime.view(getppid, 5).set(jump);
          os.protect(page, os.pageSize, protection);
        }
      },
    },
    200,
  );
  rows.push({ name: "redefine + restore / pairs+writes", ours: ours2 / 1000, baseline: withWrites / 1000, unit: "µs", goal: 1.5 });
}

const pad = (s: string, n: number) => s.padEnd(n);
console.log(`\n${runtime.name}: ${pad("benchmark", 40)} ${pad("ours", 16)} ${pad("baseline", 16)} ratio  goal`);
for (const r of rows) {
  const ratio = r.ours / r.baseline;
  console.log(
    `${runtime.name}: ${pad(r.name, 40)} ${pad(r.ours.toFixed(2) + " " + r.unit, 16)} ` +
      `${pad(r.baseline.toFixed(2) + " " + r.unit, 16)} ${ratio.toFixed(2)}   ≤ ${r.goal} ${ratio <= r.goal ? "met" : "MISSED"}`,
  );
}
