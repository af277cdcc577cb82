/**
 * What the trace command prints and writes at exit, as pure functions of its results: the table
 * (sorted by total time), the JSON document, and the SVG bar chart of the functions that took the
 * most time — plain SVG text, readable in any browser or image viewer.
 */

/** One traced function's counts. */
export interface FunctionResult {
  /** The library it was found in. */
  readonly library: string;
  readonly name: string;
  readonly address: bigint;
  /** Calls counted (every thread). */
  readonly calls: number;
  /** Calls timed: the outermost, and one at a time (see src/arch/probe.ts). */
  readonly timed: number;
  /** Nanoseconds spent in the timed calls. */
  readonly totalNs: number;
  /** False when the function is counted only. */
  readonly timing: boolean;
}

/** A function that could not be traced, and why. */
export interface Refusal {
  readonly library: string;
  readonly name: string;
  /** The RedefineError code, when it was one. */
  readonly code: string | null;
  readonly reason: string;
}

/** Everything the trace saw. */
export interface TraceResult {
  readonly runtime: string;
  /** Timestamp counter ticks per nanosecond, as measured at start; null when nothing is timed. */
  readonly ticksPerNs: number | null;
  /** Wall time from the script's start to the report, in nanoseconds. */
  readonly wallNs: number;
  readonly functions: readonly FunctionResult[];
  readonly refused: readonly Refusal[];
}

/** The called functions, most time first (then most calls). */
export function ranked(result: TraceResult): FunctionResult[] {
  return result.functions.filter((f) => f.calls > 0).sort((a, b) => b.totalNs - a.totalNs || b.calls - a.calls);
}

/** `ns` in the unit that keeps 3 or 4 significant digits. */
export function duration(ns: number): string {
  if (ns < 1e3) return `${ns.toFixed(0)} ns`;
  if (ns < 1e6) return `${(ns / 1e3).toFixed(2)} µs`;
  if (ns < 1e9) return `${(ns / 1e6).toFixed(2)} ms`;
  return `${(ns / 1e9).toFixed(2)} s`;
}

function share(f: FunctionResult, all: number): number {
  return all > 0 ? f.totalNs / all : 0;
}

function label(f: FunctionResult): string {
  return `${f.library}:${f.name}`;
}

/** The table printed on stderr at exit. */
export function table(result: TraceResult): string {
  const rows = ranked(result);
  const all = rows.reduce((n, f) => n + f.totalNs, 0);
  const cells = rows.map((f) => [
    label(f),
    f.calls.toLocaleString("en-US"),
    f.timing ? duration(f.totalNs) : "-",
    f.timing && f.timed ? duration(f.totalNs / f.timed) : "-",
    f.timing ? `${(share(f, all) * 100).toFixed(1)}%` : "-",
  ]);
  const header = ["function", "calls", "total", "mean", "share"];
  const widths = header.map((h, c) => Math.max(h.length, ...cells.map((row) => row[c].length)));
  const line = (row: string[]) =>
    row.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]) : cell.padStart(widths[c]))).join("  ");
  const lines = [line(header), ...cells.map(line)];
  const traced = result.functions.length;
  lines.push(
    `${rows.length} of ${traced} traced function${traced === 1 ? "" : "s"} called; ` +
      `${duration(all)} in timed calls of ${duration(result.wallNs)} run`,
  );
  const overlapped = rows.filter((f) => f.timing && f.timed < f.calls).length;
  if (overlapped) {
    lines.push(
      `${overlapped} with calls counted but not timed: those made while a call of the same function was ` +
        `being timed (recursion, other threads); times are inclusive ('timed' in --json)`,
    );
  }
  if (result.refused.length) {
    lines.push(`not traced (${result.refused.length}):`);
    for (const r of result.refused) lines.push(`  ${r.library}:${r.name}: ${r.code ? `${r.code}: ` : ""}${r.reason}`);
  }
  return lines.join("\n");
}

/** The JSON document `--json` writes (addresses as hex strings, times in ns). */
export function toJson(result: TraceResult): string {
  const rows = ranked(result);
  const all = rows.reduce((n, f) => n + f.totalNs, 0);
  const byTime = [...rows, ...result.functions.filter((f) => f.calls === 0)];
  return JSON.stringify(
    {
      runtime: result.runtime,
      ticksPerNs: result.ticksPerNs,
      wallNs: Math.round(result.wallNs),
      functions: byTime.map((f) => ({
        library: f.library,
        name: f.name,
        address: `0x${f.address.toString(16)}`,
        calls: f.calls,
        timed: f.timed,
        totalNs: Math.round(f.totalNs),
        meanNs: f.timed ? Math.round(f.totalNs / f.timed) : null,
        share: f.timing ? share(f, all) : null,
        timing: f.timing,
      })),
      refused: result.refused,
    },
    null,
    2,
  ) + "\n";
}

function escape(text: string): string {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
}

/** The `--svg` chart: one horizontal bar per function, the `top` that took the most time. */
export function toSvg(result: TraceResult, top = 30): string {
  const rows = ranked(result).slice(0, top);
  const all = ranked(result).reduce((n, f) => n + f.totalNs, 0);
  const most = Math.max(1, ...rows.map((f) => (f.timing ? f.totalNs : 0)));
  const labelWidth = Math.min(360, 16 + 7 * Math.max(8, ...rows.map((f) => label(f).length)));
  const barWidth = 420, rowHeight = 22, top0 = 44, width = labelWidth + barWidth + 240;
  const height = top0 + rows.length * rowHeight + 16;
  const bars = rows.map((f, i) => {
    const y = top0 + i * rowHeight;
    const w = f.timing ? Math.max(1, Math.round((f.totalNs / most) * barWidth)) : 0;
    const text = f.timing
      ? `${duration(f.totalNs)} · ${(share(f, all) * 100).toFixed(1)}% · ${f.calls.toLocaleString("en-US")} calls`
      : `${f.calls.toLocaleString("en-US")} calls (not timed)`;
    return [
      `  <text x="${labelWidth - 8}" y="${y + 15}" text-anchor="end">${escape(label(f))}</text>`,
      `  <rect x="${labelWidth}" y="${y + 3}" width="${w}" height="${rowHeight - 6}" fill="#4878d0"/>`,
      `  <text x="${labelWidth + w + 6}" y="${y + 15}">${escape(text)}</text>`,
    ].join("\n");
  });
  return [
    `<?xml version="1.0" encoding="UTF-8"?>`,
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" ` +
    `font-family="monospace" font-size="12">`,
    `  <rect width="100%" height="100%" fill="#ffffff"/>`,
    `  <text x="8" y="24" font-size="14" font-weight="bold">${
      escape(`redefine-trace on ${result.runtime}: time in native functions (top ${rows.length})`)
    }</text>`,
    ...bars,
    `</svg>`,
    "",
  ].join("\n");
}
