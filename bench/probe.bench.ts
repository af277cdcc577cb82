/**
 * Benchmarks of the probes, each a ratio against the cheapest thing that does the same job, in the
 * same run, rounds interleaved (the machines are noisy: compare ratios, not nanoseconds). Run by
 * `npm run bench` under both runtimes.
 */
import { attach, redefine } from "../mod.ts";
import { platform } from "../platform/mod.ts";

const { runtime } = platform();
const libc = runtime.open("libc.so.6", { labs: { parameters: ["i64"], result: "i64" } });

/** Nanoseconds per call of `body`, over `n` calls. */
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
function compare(a: Case, b: Case, n: number, rounds = 21): [number, number] {
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

interface Row {
  name: string;
  ours: number;
  baseline: number;
  goal: number;
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
  rows.push({ name: "attach / replacement calling original", ours, baseline, goal: 1.1 });
}

const pad = (s: string, n: number) => s.padEnd(n);
console.log(`\n${runtime.name}: ${pad("benchmark", 44)} ${pad("ours", 14)} ${pad("baseline", 14)} ratio  goal`);
for (const r of rows) {
  const ratio = r.ours / r.baseline;
  console.log(
    `${runtime.name}: ${pad(r.name, 44)} ${pad(r.ours.toFixed(2) + " ns/call", 14)} ` +
      `${pad(r.baseline.toFixed(2) + " ns/call", 14)} ${ratio.toFixed(2)}   ≤ ${r.goal} ${ratio <= r.goal ? "met" : "MISSED"}`,
  );
}
