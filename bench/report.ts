/**
 * What every benchmark shares: timing in interleaved rounds (the machines are noisy, so a figure
 * is always set against its baseline measured in the same run, and each is its best round: on a
 * shared machine interference only ever adds time), and the report — a table on
 * stdout, plus one `@row` JSON line per figure that `npm run bench` (scripts/bench.mjs) gathers
 * from the three runtimes into one table.
 */
import { platform } from "../platform/mod.ts";

/** One figure: ours against the cheapest thing that does the same job, and the goal. */
export interface Row {
  readonly name: string;
  readonly ours: number;
  /** Null when the goal is a bound on ours alone (memory per patch). */
  readonly baseline: number | null;
  readonly unit: string;
  /**
   * The goal: `ratio` bounds ours / baseline, `most` bounds ours itself (in `unit`), `delta` bounds
   * ours - baseline; `least` is a ratio to reach at least (a speed-up).
   */
  readonly goal: { readonly ratio?: number; readonly most?: number; readonly delta?: number; readonly least?: number };
}

/** A measured body with untimed set-up and tear-down around each round. */
export interface Case {
  readonly body: () => void;
  readonly setUp?: () => void;
  readonly tearDown?: () => void;
}

/** Nanoseconds per call of `body`, over `n` calls. */
export function timePer(body: () => void, n: number): number {
  const start = performance.now();
  for (let i = 0; i < n; i++) body();
  return ((performance.now() - start) * 1e6) / n;
}

/** The best (least) of `xs`. */
export function best(xs: readonly number[]): number {
  return Math.min(...xs);
}

/** The median of `xs`. */
export function median(xs: readonly number[]): number {
  return [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)]!;
}

/**
 * Interleaves rounds of `a` and `b` so drift hits both alike; in ns per call, the rounds' `pick`
 * (the best by default).
 */
export function compare(
  a: Case,
  b: Case,
  n: number,
  rounds = 15,
  pick: (xs: readonly number[]) => number = best,
): [number, number] {
  const as: number[] = [], bs: number[] = [];
  for (let r = 0; r < rounds; r++) {
    for (const [c, out] of [[a, as], [b, bs]] as const) {
      c.setUp?.();
      out.push(timePer(c.body, n));
      c.tearDown?.();
    }
  }
  return [pick(as), pick(bs)];
}

/** Whether `row` meets its goal. */
export function met(row: Row): boolean {
  const { ratio, most, delta, least } = row.goal;
  const base = row.baseline ?? NaN;
  const r = row.ours / base;
  return (ratio === undefined || r <= ratio) && (most === undefined || row.ours <= most) &&
    (delta === undefined || row.ours - base <= delta) && (least === undefined || r >= least);
}

/** The goal as text: `≤ 1.05×`, `≤ 3 µs`, `≤ +10 ms`, `≥ 10×`. */
export function goalText(row: Row): string {
  const { ratio, most, delta, least } = row.goal;
  return [
    ratio !== undefined ? `≤ ${ratio}×` : "",
    most !== undefined ? `≤ ${most} ${row.unit}` : "",
    delta !== undefined ? `≤ +${delta} ${row.unit}` : "",
    least !== undefined ? `≥ ${least}×` : "",
  ].filter(Boolean).join(", ");
}

/** Prints `rows` as this runtime's table, and each as an `@row` line for scripts/bench.mjs. */
export function report(rows: readonly Row[]): void {
  const name = platform().runtime.name;
  const figure = (v: number | null, unit: string) => (v === null ? "—" : `${v.toFixed(v < 10 ? 2 : 1)} ${unit}`).padEnd(16);
  console.log(`\n${name}: ${"benchmark".padEnd(58)} ${"ours".padEnd(16)} ${"baseline".padEnd(16)} ratio  goal`);
  for (const row of rows) {
    console.log(
      `${name}: ${row.name.padEnd(58)} ${figure(row.ours, row.unit)} ${figure(row.baseline, row.unit)} ` +
        `${(row.baseline === null ? "—" : (row.ours / row.baseline).toFixed(2)).padEnd(6)} ${goalText(row) || "—"} ` +
        (!goalText(row) ? "" : met(row) ? "met" : "MISSED"),
    );
  }
  for (const row of rows) console.log(`@row ${JSON.stringify({ runtime: name, ...row })}`);
}
