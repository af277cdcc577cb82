// `npm pack`'s prepack: the JavaScript and declarations that Node (and any runtime without the
// "bun" or "deno" export condition) loads, compiled from the TypeScript sources into dist/: the
// declarations file by file (tsc), the JavaScript as one module (Bun's bundler), since Node pays
// for every file it resolves and compiles: a third of its start-up with sixty-odd files, and a few
// ms with ten (the bundle split at its dynamic imports). No file imports a builtin module (each
// asks `process.getBuiltinModule`), so the bundle imports nothing.
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { sh } from "./steps.mjs";

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
  // Quiet unless it fails: `npm pack --json` prints what it packed after this on standard output.
  const ok = [
    [bin("tsc"), ["-p", "tsconfig.dist.json", "--emitDeclarationOnly"]],
    [bin("bun"), ["build", "mod.ts", "--target=node", "--format=esm", "--outfile=dist/mod.js"]],
  ].every(([command, args]) => {
    const result = sh(command, args, { cwd: root });
    if (result.status !== 0) process.stderr.write(`${result.stdout}${result.stderr}${result.error ?? ""}`);
    return result.status === 0;
  });
  process.exit(ok ? 0 : 1);
}
