// `npm run demo`: the demo example on the three runtimes (node_modules/.bin/node is Node 26 from npm).
import { spawnSync } from "node:child_process";

const root = new URL("..", import.meta.url).pathname;
const example = process.argv[2] ?? "examples/hex_atoi.ts";
for (const [runtime, args] of [["deno", ["run", "--allow-ffi", example]], ["bun", [example]], ["node", [example]]]) {
  console.log(`\n$ ${runtime} ${args.join(" ")}`);
  const result = spawnSync(`${root}node_modules/.bin/${runtime}`, args, { cwd: root, stdio: "inherit" });
  if (result.status !== 0) process.exitCode = 1;
}
