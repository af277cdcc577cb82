// The package's JavaScript and declarations in dist/, compiled from the TypeScript sources: what
// every runtime's users load (npm's prepack, the JSR publish, npm test and the start-up bench run
// it first; dist/ is not in git). The declarations come file by file from tsc. The JavaScript is
// one bundle per operating system and CPU, dist/<os>-<cpu>.js, each without the other systems'
// and CPU's layers (Deno's, dist/deno-<os>-<cpu>.js, also without the Bun and Node adapters and
// compiled eagerly: scripts/eager.mjs), and dist/mod.js (dist/deno.js for Deno), which loads this
// process's one: start-up is mostly parsing (Node and Bun compile every byte they load, each module file costs
// Node about 0.4 ms more), so a process parses one file of ~155 KB instead of the sources' fifty
// files or an all-platform bundle of 230 KB. The bundles are minified in whitespace and syntax but
// keep every name (stack traces name our functions, `RedefineError.name` stays), start with
// `// @bun` (Bun then runs them without transpiling) and carry source maps into the TypeScript
// sources the package ships beside them. No file imports a builtin module (each asks
// `process.getBuiltinModule`), so no bundle imports anything. Run by Node, it runs itself again
// under Bun for the bundles (Bun's bundler).
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { eager } from "./eager.mjs";
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

/** Every operating system the sources support, and every CPU: its instruction set's name, and Node's. */
const SYSTEMS = ["linux", "darwin", "windows"];
const CPUS = [["x86_64", "x64"], ["aarch64", "arm64"]];

/**
 * Bun's bundler, by a plugin, leaves out of one system's bundle the OS layers and the instruction
 * set it cannot use: the files platform/mod.ts and src/arch/mod.ts import dynamically by name.
 */
function onlyFor(system, cpu, name, forDeno) {
  const unused = new Set([
    ...SYSTEMS.filter((os) => os !== system).map((os) => `./${os}.ts`),
    ...(forDeno ? ["./bun.ts", "./node.ts"] : []),
    ...CPUS.filter(([arch]) => arch !== cpu).map(([arch]) => `./${arch}/mod.ts`),
  ]);
  return {
    name: `only ${forDeno ? "deno-" : ""}${system}-${name}`,
    setup(build) {
      build.onResolve({ filter: /^\.\/[\w/]+\.ts$/ }, ({ path, importer }) =>
        unused.has(path) && /\/(platform|src\/arch)\/mod\.ts$/.test(importer) ? { path, namespace: "unused" } : undefined);
      // Never loaded: dist/mod.js picks the bundle by the same names the runtime adapters report.
      build.onLoad({ filter: /.*/, namespace: "unused" }, ({ path }) => ({
        contents: `throw new Error("redefine's ${forDeno ? "deno-" : ""}${system}-${name} bundle leaves out ${path}");`,
        loader: "js",
      }));
    },
  };
}

/**
 * A bundle's map without the sources' text: it points into the sources shipped beside dist/
 * (`../src/...`). Null contents, not none: Bun refuses a map without the array.
 */
function shrinkMap(map) {
  return { ...map, sourcesContent: map.sources.map(() => null) };
}

/**
 * The entry that picks this process's bundle and re-exports it, with string-literal imports (JSR
 * and Deno see them). dist/mod.js, for Node and Bun, asks `process.platform` and `process.arch`,
 * written literally, so that a bundler that knows the target's (`bun build --compile` does;
 * others by `--define`) keeps only its bundle instead of all six. dist/deno.js asks `Deno.build`:
 * Deno's first touch of `process` costs ~12 ms (it sets up its Node compatibility then). Another
 * system or CPU gets Linux's or x86-64's bundle, whose platform() then says it is unsupported.
 * The types, for Deno and JSR, are the sources' (mod.ts: JSR's documentation and checks stay what
 * they were): Deno cannot follow tsc's declarations, whose imports name .ts files.
 */
function entry(names, [os, cpu], [darwin, windows, arm], prefix) {
  const load = (system) => {
    const [x64, arm64] = CPUS.map(([, name]) => `await import("./${prefix}${system}-${name}.js")`);
    return `arm ? ${arm64} : ${x64}`;
  };
  return `// @bun
// @ts-self-types="../mod.ts"
// redefine for this process's operating system and CPU: dist/${prefix}<os>-<cpu>.js (scripts/build.mjs).
const arm = ${cpu} === "${arm}";
const bundle = ${os} === "${darwin}"
  ? ${load("darwin")}
  : ${os} === "${windows}"
  ? ${load("windows")}
  : ${load("linux")};
export const { ${names.join(", ")} } = bundle;
`;
}

/**
 * One system's bundle, for Node and Bun or, `forDeno`, for Deno: without the other runtimes'
 * adapters and with its functions compiled with the module (scripts/eager.mjs), which Deno's code
 * cache then keeps. Its output's metafile entry, for the names it exports.
 */
async function bundle(system, cpu, name, forDeno) {
  const file = `${forDeno ? "deno-" : ""}${system}-${name}.js`;
  const result = await globalThis.Bun.build({
    entrypoints: [`${root}mod.ts`],
    outdir: `${root}dist`,
    naming: file,
    target: "bun",
    format: "esm",
    minify: { whitespace: true, syntax: true, identifiers: false },
    keepNames: true,
    sourcemap: "linked",
    metafile: true,
    plugins: [onlyFor(system, cpu, name, forDeno)],
  });
  if (!result.success) throw new AggregateError(result.logs, `bun build for ${file} failed`);
  let map = JSON.parse(readFileSync(`${root}dist/${file}.map`, "utf8"));
  if (forDeno) {
    const rewritten = eager(bin("node"), readFileSync(`${root}dist/${file}`, "utf8"), map);
    writeFileSync(`${root}dist/${file}`, rewritten.code);
    map = rewritten.map;
  }
  writeFileSync(`${root}dist/${file}.map`, JSON.stringify(shrinkMap(map)));
  return Object.values(result.metafile.outputs).find((o) => o.entryPoint);
}

/** The twelve bundles (run by Bun: its bundler), then the entries over them. */
async function bundles() {
  const outputs = [];
  for (const system of SYSTEMS) {
    for (const [cpu, name] of CPUS) {
      for (const forDeno of [false, true]) outputs.push(await bundle(system, cpu, name, forDeno));
    }
  }
  const names = outputs[0].exports.toSorted();
  if (outputs.some((o) => o.exports.toSorted().join() !== names.join())) throw new Error("the bundles export different names");
  writeFileSync(`${root}dist/mod.js`, entry(names, ["process.platform", "process.arch"], ["darwin", "win32", "arm64"], ""));
  writeFileSync(`${root}dist/deno.js`, entry(names, ["Deno.build.os", "Deno.build.arch"], ["darwin", "windows", "aarch64"], "deno-"));
}

if (process.argv[1] === new URL(import.meta.url).pathname) {
  if (process.argv[2] === "--bundles") {
    await bundles();
  } else {
    // Quiet unless it fails: `npm pack --json` prints what it packed after this on standard output.
    writeDenoTypes();
    rmSync(`${root}dist`, { recursive: true, force: true });
    const ok = [
      [bin("tsc"), ["-p", "tsconfig.dist.json", "--emitDeclarationOnly"]],
      [bin("bun"), [new URL(import.meta.url).pathname, "--bundles"]],
    ].every(([command, args]) => {
      const result = sh(command, args, { cwd: root });
      if (result.status !== 0) process.stderr.write(`${result.stdout}${result.stderr}${result.error ?? ""}`);
      return result.status === 0;
    });
    process.exit(ok ? 0 : 1);
  }
}
