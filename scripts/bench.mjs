// `npm run bench`: every benchmark under bench/ on the three runtimes, ratios side by side.
import { spawnSync } from "node:child_process";
import { readdirSync } from "node:fs";

const root = new URL("..", import.meta.url).pathname;
// node_modules/.bin/node is Node 26 from npm: a bare `node` may be another Node.
const bin = (name) => `${root}node_modules/.bin/${name}`;
for (const file of readdirSync(`${root}bench`).filter((f) => f.endsWith(".bench.ts")).sort()) {
  for (const [runtime, args] of [["deno", ["run", "-A", "--no-check"]], ["bun", ["run"]], ["node", ["--no-warnings"]]]) {
    console.log(`\n### ${file} on ${runtime}`);
    const result = spawnSync(bin(runtime), [...args, `bench/${file}`], { cwd: root, stdio: "inherit" });
    if (result.status !== 0) process.exitCode = 1;
  }
}
