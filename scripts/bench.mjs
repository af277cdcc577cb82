// `npm run bench`: every benchmark under bench/ on both runtimes, ratios side by side.
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";

const root = new URL("..", import.meta.url).pathname;
const bin = (name) => `${root}node_modules/.bin/${name}`;
for (const file of readdirSync(`${root}bench`).filter((f) => f.endsWith(".bench.ts")).sort()) {
  for (const [runtime, args] of [["deno", ["run", "-A", "--no-check"]], ["bun", ["run"]]]) {
    console.log(`\n### ${file} on ${runtime}`);
    const result = spawnSync(bin(runtime), [...args, `bench/${file}`], { cwd: root, stdio: "inherit" });
    if (result.status !== 0) process.exitCode = 1;
  }
}
