// `npm pack`'s prepack: the JavaScript and declarations that Node (and any runtime without the
// "bun" or "deno" export condition) loads, compiled from the TypeScript sources into dist/.
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { echoed, sh } from "./steps.mjs";

const root = new URL("..", import.meta.url).pathname;
const bin = (name) => `${root}node_modules/.bin/${name}`;

/** Deno's own declarations in .cache/, so that tsc can check and compile the Deno adapter. */
export function writeDenoTypes() {
  mkdirSync(`${root}.cache`, { recursive: true });
  const types = sh(bin("deno"), ["types"]);
  if (types.status !== 0) throw new Error(`deno types failed: ${types.stderr}`);
  writeFileSync(`${root}.cache/lib.deno.d.ts`, types.stdout);
}

if (process.argv[1] === new URL(import.meta.url).pathname) {
  writeDenoTypes();
  rmSync(`${root}dist`, { recursive: true, force: true });
  const { ok } = echoed(bin("tsc"), ["-p", "tsconfig.dist.json"], { cwd: root });
  process.exit(ok ? 0 : 1);
}
