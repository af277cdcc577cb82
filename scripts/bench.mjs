// `npm run bench [-- name...]`: every benchmark under bench/ (or those whose file name contains a
// given name) on the three runtimes, then one table of every figure side by side: ours, baseline,
// ratio and goal for Deno, Bun and Node (the `@row` lines bench/report.ts prints).
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";

const root = new URL("..", import.meta.url).pathname;
// node_modules/.bin/node is Node 26 from npm: a bare `node` may be another Node.
const bin = (name) => `${root}node_modules/.bin/${name}`;
const runtimes = [["deno", ["run", "-A", "--no-check"]], ["bun", ["run"]], ["node", ["--no-warnings"]]];
const only = process.argv.slice(2);
const rows = new Map();
for (const file of readdirSync(`${root}bench`).filter((f) => f.endsWith(".bench.ts")).sort()) {
  if (only.length && !only.some((name) => file.includes(name))) continue;
  for (const [runtime, args] of runtimes) {
    console.log(`\n### ${file} on ${runtime}`);
    const result = spawnSync(bin(runtime), [...args, `bench/${file}`], {
      cwd: root,
      stdio: ["inherit", "pipe", "inherit"],
      encoding: "utf8",
      maxBuffer: 1 << 26,
    });
    for (const line of (result.stdout ?? "").split("\n")) {
      if (!line.startsWith("@row ")) {
        if (line) console.log(line);
        continue;
      }
      const row = JSON.parse(line.slice(5));
      if (!rows.has(row.name)) rows.set(row.name, { goal: row.goal, unit: row.unit, by: {} });
      rows.get(row.name).by[row.runtime] = row;
    }
    if (result.status !== 0) {
      console.log(`${runtime}: bench/${file} exited with ${result.status ?? result.signal}`);
      process.exitCode = 1;
    }
  }
}

const fixed = (v) => v.toFixed(Math.abs(v) < 10 ? 2 : 1);
function goalText({ goal, unit }) {
  return [
    goal.ratio !== undefined ? `≤ ${goal.ratio}×` : "",
    goal.most !== undefined ? `≤ ${goal.most} ${unit}` : "",
    goal.delta !== undefined ? `≤ +${goal.delta} ${unit}` : "",
    goal.least !== undefined ? `≥ ${goal.least}×` : "",
  ].filter(Boolean).join(", ");
}
function met({ goal }, row) {
  const r = row.ours / (row.baseline ?? NaN);
  return (goal.ratio === undefined || r <= goal.ratio) && (goal.most === undefined || row.ours <= goal.most) &&
    (goal.delta === undefined || row.ours - row.baseline <= goal.delta) && (goal.least === undefined || r >= goal.least);
}
function cell(entry, row) {
  if (!row) return "—";
  const verdict = !goalText(entry) ? "" : met(entry, row) ? "met" : "**missed**";
  if (row.baseline === null) return `${fixed(row.ours)} ${row.unit} ${verdict}`;
  const ratio = row.ours / row.baseline;
  const shown = entry.goal.delta !== undefined ? `+${fixed(row.ours - row.baseline)} ${row.unit}` : `${fixed(ratio)}×`;
  return `${fixed(row.ours)} / ${fixed(row.baseline)} ${row.unit} = ${shown} ${verdict}`;
}

console.log("\n## All figures (ours / baseline = ratio; goal)\n");
console.log(`| benchmark | goal | ${runtimes.map(([r]) => r[0].toUpperCase() + r.slice(1)).join(" | ")} |`);
console.log(`| --- | --- | ${runtimes.map(() => "---").join(" | ")} |`);
for (const [name, entry] of rows) {
  console.log(`| ${name} | ${goalText(entry) || "—"} | ${runtimes.map(([r]) => cell(entry, entry.by[r])).join(" | ")} |`);
}
