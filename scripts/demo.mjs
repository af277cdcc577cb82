// `npm run demo`: the demo example on both runtimes.
import { spawnSync } from "node:child_process";

const root = new URL("..", import.meta.url).pathname;
const example = process.argv[2] ?? "examples/hex_atoi.ts";
for (const [runtime, args] of [["deno", ["run", "--allow-ffi", example]], ["bun", [example]]]) {
  console.log(`\n$ ${runtime} ${args.join(" ")}`);
  const result = spawnSync(`${root}node_modules/.bin/${runtime}`, args, { cwd: root, stdio: "inherit" });
  if (result.status !== 0) process.exitCode = 1;
}
