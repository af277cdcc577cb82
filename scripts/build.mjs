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
// `process.getBuiltinModule`), so no bundle imports anything. The build machine's own system's
// bundle (Linux) also comes precompiled for Bun and for Node (`precompile`), which dist/mod.js
// loads first there. Run by Node, it runs itself again under Bun for the bundles (Bun's bundler),
// then Node once more for Node's code cache.
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { eager, mappingsOf, segmentsOf } from "./eager.mjs";
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
 * they were): Deno cannot follow tsc's declarations, whose imports name .ts files. `compiled`
 * names the bundles that also come precompiled (`precompile`): dist/mod.js loads those forms
 * first, on Bun and on Node, and the module itself wherever they cannot serve.
 */
function entry(names, [os, cpu], [darwin, windows, arm], prefix, compiled = []) {
  const load = (system) => {
    const [x64, arm64] = CPUS.map(([, name]) => {
      const file = `${system}-${name}`;
      const module = `await import("./${prefix}${file}.js")`;
      return compiled.includes(file)
        ? `globalThis.Bun !== undefined ? await bunCompiled(import("./${file}.bun.cjs")) ?? ${module} : await nodeCompiled("${file}", "${digestsToCome(file)}") ?? ${module}`
        : module;
    });
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
${compiled.length ? COMPILED_LOADERS : ""}`;
}

/** `value` as a signed LEB128 number, as WebAssembly encodes an immediate. */
function leb128(value) {
  const bytes = [];
  for (;;) {
    const low = Number(BigInt.asUintN(7, value));
    value >>= 7n;
    const last = (value === 0n && low < 0x40) || (value === -1n && low >= 0x40);
    bytes.push(last ? low : low | 0x80);
    if (last) return bytes;
  }
}

/** A WebAssembly section or vector: `id` (none for a vector), then the length of `bytes`, then them. */
function sized(id, bytes) {
  return [...(id === null ? [] : [id]), ...leb128(BigInt(bytes.length)), ...bytes];
}

/**
 * A WebAssembly module whose function d(start, end) is FNV-1a over its imported memory's 8-byte
 * words from `start` up to `end` (the last word read whole): each step (xor, times an odd number)
 * is a bijection, so any one changed word changes the result. Node's hash functions would do, but
 * loading node:crypto costs 13-27 ms, node:zlib (crc32) 7-10, and JS code hashing the ~380 KB of
 * a cache and its script 2-3 ms on its first run; this ~0.3-0.4 ms, most of it compiling the
 * process's first WebAssembly (~0.2) and the first call (~0.1).
 */
const DIGEST_MODULE = [
  0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // "\0asm", version 1
  ...sized(0x01, [0x01, 0x60, 0x02, 0x7f, 0x7f, 0x01, 0x7e]), // types: (i32 start, i32 end) -> i64
  ...sized(0x02, [0x01, 0x01, 0x6d, 0x01, 0x6d, 0x02, 0x00, 0x00]), // imports: memory "m" "m", 0 pages or more
  ...sized(0x03, [0x01, 0x00]), // functions: one, of type 0
  ...sized(0x07, [0x01, 0x01, 0x64, 0x00, 0x00]), // exports: "d", function 0
  ...sized(0x0a, [0x01, ...sized(null, [ // code: one body
    0x01, 0x01, 0x7e, // locals: h, an i64 (local 2)
    0x42, ...leb128(BigInt.asIntN(64, 0xcbf29ce484222325n)), 0x21, 0x02, // h = FNV's offset basis
    0x02, 0x40, // block
    0x03, 0x40, //   loop
    0x20, 0x00, 0x20, 0x01, 0x4f, 0x0d, 0x01, //     br_if out: start >= end (unsigned)
    0x20, 0x02, 0x20, 0x00, 0x29, 0x03, 0x00, 0x85, //     h ^ i64.load(start)
    0x42, ...leb128(0x100000001b3n), 0x7e, 0x21, 0x02, //     h = that * FNV's prime
    0x20, 0x00, 0x41, 0x08, 0x6a, 0x21, 0x00, //     start += 8
    0x0c, 0x00, //     br loop
    0x0b, 0x0b, //   end, end
    0x20, 0x02, 0x0b, // return h
  ])]),
];

/**
 * The files at `paths`, read into one WebAssembly memory, each at a multiple of 8 with zeros
 * after it, and each one's digest by `wasm` (DIGEST_MODULE): its length and FNV-1a, as text.
 * Shared by the build, which writes the digests into dist/mod.js, and dist/mod.js, which checks
 * them (its text is this function's). Throws where a file cannot be read whole.
 */
function readDigested(paths, wasm) {
  const { closeSync, fstatSync, openSync, readSync } = globalThis.process.getBuiltinModule("node:fs");
  const fds = [];
  try {
    for (const path of paths) fds.push(openSync(path, "r"));
    const sizes = fds.map((fd) => fstatSync(fd).size);
    const starts = [];
    let capacity = 0;
    for (const size of sizes) {
      starts.push(capacity);
      capacity += Math.ceil(size / 8) * 8;
    }
    const memory = new WebAssembly.Memory({ initial: Math.max(1, Math.ceil(capacity / 65536)) });
    const { d } = new WebAssembly.Instance(new WebAssembly.Module(new Uint8Array(wasm)), { m: { m: memory } }).exports;
    return fds.map((fd, i) => {
      const bytes = new Uint8Array(memory.buffer, starts[i], sizes[i]);
      for (let at = 0; at < bytes.length;) {
        const read = readSync(fd, bytes, at, bytes.length - at, at);
        if (read === 0) throw new Error(`${paths[i]} is shorter than it was`);
        at += read;
      }
      return { bytes, digest: `${sizes[i]}:${BigInt.asUintN(64, d(starts[i], starts[i] + sizes[i])).toString(36)}` };
    });
  } finally {
    for (const fd of fds) closeSync(fd);
  }
}

/** What dist/mod.js says for `file`'s digests until the Node cache step writes them (`nodeCache`). */
const digestsToCome = (file) => `digests of ${file}.script.js and .node-cache`;

/**
 * dist/mod.js's loaders of a bundle precompiled for Bun and for Node (`precompile`); each gives
 * null where it cannot serve, and the module is imported instead. Bun's, given the import of the
 * CommonJS module (a literal `import()`, which bundlers see), runs the function it exports; null
 * where that import fails (the file is missing, as a publish leaving it out would have it, or does
 * not load) or a bundler took the file for plain CommonJS (`bun build --compile` does: it drops
 * the wrapper Bun's loader reads the file by, and the module exports nothing), which then has the
 * module too. An error of the function itself is the module's own (the module would throw it
 * too; running it again would run the body twice): it is not caught. Node's runs the bundle as a script with the code cache
 * V8 made of it at build time; null under Deno, where stack traces are mapped to the sources
 * (Node's --enable-source-maps) or coverage is collected (NODE_V8_COVERAGE), since Node maps only
 * what its module loaders loaded, where the files are not beside this one (a bundler copied
 * this one alone), and where this module runs in a vm context (Jest, Vitest's vmThreads): a
 * script runs in Node's main context, whose builtins node:fs's are, and the bundle would belong
 * to another realm than its importer. A dynamic import in the script would load as the module's
 * does. The cache is passed to V8 only if it and the script are what the build made (their
 * digests, which the build wrote here): V8 checks only the script's length, so an edit of the
 * same length (patch-package) would run the old code, and aborts the process on a corrupted
 * cache. A cache V8 rejects (another Node, other V8 flags) or one not passed leaves the script
 * compiled from its text, as the module would be.
 */
const COMPILED_LOADERS = `
async function bunCompiled(loading) {
  let run;
  try {
    ({ default: run } = await loading);
  } catch {
    return null;
  }
  return typeof run === "function" ? run() : null;
}

function nodeCompiled(name, digests) {
  const process = globalThis.process;
  if (globalThis.Deno !== undefined || process.sourceMapsEnabled || process.env.NODE_V8_COVERAGE) return null;
  const { Script, constants } = process.getBuiltinModule("node:vm");
  if (Object.getPrototypeOf(Script.prototype.runInThisContext) !== Function.prototype) return null;
  let file, script, cache;
  try {
    const { fileURLToPath } = process.getBuiltinModule("node:url");
    file = fileURLToPath(new URL(\`./\${name}.script.js\`, import.meta.url));
    [script, cache] = readDigested([file, \`\${file.slice(0, -".script.js".length)}.node-cache\`], ${JSON.stringify(DIGEST_MODULE)});
  } catch {
    return null;
  }
  const { Buffer } = process.getBuiltinModule("node:buffer");
  const text = Buffer.from(script.bytes.buffer, script.bytes.byteOffset, script.bytes.length).toString();
  const cachedData = \`\${script.digest} \${cache.digest}\` === digests ? cache.bytes : undefined;
  const importModuleDynamically = constants.USE_MAIN_CONTEXT_DEFAULT_LOADER;
  return new Script(text, { filename: file, cachedData, importModuleDynamically }).runInThisContext()();
}

${readDigested}
`;

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

/**
 * The bundle `file` (dist/<file>.js) as a classic script: an async function, strict as a module is,
 * that runs the module's body and returns its exports. Line 0 (the module's `// @bun`, which the
 * source map maps nothing on) becomes the function's head, so every other line keeps its place
 * and the bundle's source map holds for the script too.
 */
function scriptOf(file) {
  const code = readFileSync(`${root}dist/${file}.js`, "utf8");
  // The export list is the module's last statement: after it come only the map's comments.
  const found = [...code.matchAll(/(?<=[;}\n])export\{([\w$,]+)\};(?=(\s*\/\/#[^\n]*)*\s*$)/g)];
  if (found.length !== 1 || !code.startsWith("// @bun\n")) throw new Error(`dist/${file}.js is not one module with one export list at its end`);
  // A script has no import.meta (a syntax error there): the sources would need another way.
  if (/\bimport\.meta\b/.test(code)) throw new Error(`dist/${file}.js uses import.meta, which a script cannot`);
  const [{ index, 1: names }] = found;
  return `(async function(){"use strict";\n${code.slice("// @bun\n".length, index)}return{${names}};\n})`;
}

/**
 * `outer`'s map (of code made from one generated file) through `inner` (that file's map): each
 * segment leads where `inner` leads its position, to the sources.
 */
function composedMap(outer, inner) {
  const byLine = [];
  for (const s of segmentsOf(inner.mappings)) (byLine[s.line] ??= []).push(s);
  const segments = [];
  for (const s of segmentsOf(outer.mappings)) {
    if (s.rest.length < 3) continue;
    const [, line, column] = s.rest;
    const candidates = byLine[line] ?? [];
    let found = null;
    for (const c of candidates) {
      if (c.column > column) break;
      found = c;
    }
    if (found && found.rest.length >= 3) segments.push({ line: s.line, column: s.column, rest: found.rest });
  }
  return { ...outer, sources: inner.sources, sourcesContent: inner.sources.map(() => null), names: inner.names, mappings: mappingsOf(segments) };
}

/** The bundle `precompile` makes this system's: Linux's, where a first patch can be made here; or null. */
function precompiled() {
  const name = CPUS.find(([, n]) => n === process.arch)?.[1];
  return process.platform === "linux" && name ? `linux-${name}` : null;
}

/**
 * This system's bundle, where a first patch can be made here (Linux), precompiled for Bun and Node,
 * which keep no code cache of a module a library can use, so parse and compile its code on every
 * start (~7 ms of a first patch's ~12): dist/<file>.script.js, the bundle as a script, which
 * dist/mod.js runs on Node with dist/<file>.node-cache (`nodeCache`), and dist/<file>.bun.cjs, the
 * script as a CommonJS module with the bytecode Bun's bundler compiles beside it (.jsc; Bun has
 * bytecode for CommonJS only, and the module's top-level await keeps the bundle from being one).
 * Each cache is of the runtime version that made it (npm's node and bun, the devDependencies): any
 * other version rejects it and compiles the text, as it would the module. Null where none is made.
 */
async function precompile() {
  const file = precompiled();
  if (!file) return null;
  const script = scriptOf(file);
  writeFileSync(`${root}dist/${file}.script.js`, `${script}\n//# sourceMappingURL=${file}.js.map\n`);
  const input = `${root}.cache/${file}.bun-entry.cjs`;
  mkdirSync(`${root}.cache`, { recursive: true });
  // Strict for the whole file: Bun keeps a file's directive, not a function's.
  writeFileSync(input, `"use strict";module.exports=${script};\n`);
  const result = await globalThis.Bun.build({
    entrypoints: [input],
    outdir: `${root}dist`,
    naming: `${file}.bun.cjs`,
    target: "bun",
    format: "cjs",
    bytecode: true,
    // The text is the bundle's already: only its whitespace again, and no second set of names.
    minify: { whitespace: true, syntax: false, identifiers: false },
    sourcemap: "linked",
  });
  if (!result.success) throw new AggregateError(result.logs, `bun build for ${file}.bun.cjs failed`);
  const map = `${root}dist/${file}.bun.cjs.map`;
  writeFileSync(map, JSON.stringify(composedMap(JSON.parse(readFileSync(map, "utf8")), JSON.parse(readFileSync(`${root}dist/${file}.js.map`, "utf8")))));
  return file;
}

/** The start-up benchmark's first patch and its restore (bench/startup/first_patch.mjs), by the bundle's `redefine`. */
function firstPatch(redefine) {
  redefine({ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" }).restore();
}

/**
 * The V8 flags of the Node that makes the code cache: none that V8 checks a cache against (one made
 * under `--expose-gc`, or `--hash-seed=1`, is rejected by every process without the flag), but a
 * fixed seed for V8's random numbers, from which it takes its string hash seed. With a seed of its
 * own each run, the cache's hash tables are laid out by it: six runs of this step made six caches,
 * of 221,096 to 221,160 bytes. With this one, builds make the same bytes but for what timing
 * moves (on a loaded machine ~1 build in 4 has 4 bytes apart by one bit, per-function state that
 * garbage collections change), and a process with its own seed, every user's, takes the cache as
 * it took one made with a random seed (checked with `cachedDataRejected` and
 * --profile-deserialization; Node 26.10).
 */
const NODE_CACHE_FLAGS = ["--random-seed=1"];

/**
 * Node's code cache of dist/<file>.script.js (run by Node: npm's node, with no V8 flags but a
 * fixed random seed, `NODE_CACHE_FLAGS`), made after `patch` (a first patch and its restore): V8
 * keeps in it every function compiled so far, so the functions a first patch runs come compiled
 * too. Where the patch fails (a machine that cannot patch: a hardened kernel, a sandbox), the
 * cache is made of the import alone and one line of warning says so: the build goes on.
 */
async function nodeCache(file, patch = firstPatch) {
  const { Script, constants } = process.getBuiltinModule("node:vm");
  const path = `${root}dist/${file}.script.js`;
  const importModuleDynamically = constants.USE_MAIN_CONTEXT_DEFAULT_LOADER;
  // Named apart from where the build runs: V8 keeps the name in the cache (a process that takes it
  // names the script its own way, by its own path), and the build's path made the bytes differ
  // from one checkout to another.
  const script = new Script(readFileSync(path, "utf8"), { filename: `redefine/dist/${file}.script.js`, importModuleDynamically });
  const { redefine } = await script.runInThisContext()();
  try {
    patch(redefine);
  } catch (error) {
    process.stderr.write(`warning: dist/${file}.node-cache holds the bundle's import alone: a first patch failed here (${error.message})\n`);
  }
  writeFileSync(`${root}dist/${file}.node-cache`, script.createCachedData());
  const digests = readDigested([path, `${root}dist/${file}.node-cache`], DIGEST_MODULE).map((f) => f.digest).join(" ");
  const entry = readFileSync(`${root}dist/mod.js`, "utf8");
  const placed = entry.replace(`"${digestsToCome(file)}"`, JSON.stringify(digests));
  if (placed === entry) throw new Error(`dist/mod.js does not load ${file} precompiled`);
  writeFileSync(`${root}dist/mod.js`, placed);
}

/** The twelve bundles (run by Bun: its bundler), this system's precompiled, then the entries over them. */
async function bundles() {
  const outputs = [];
  for (const system of SYSTEMS) {
    for (const [cpu, name] of CPUS) {
      for (const forDeno of [false, true]) outputs.push(await bundle(system, cpu, name, forDeno));
    }
  }
  const names = outputs[0].exports.toSorted();
  if (outputs.some((o) => o.exports.toSorted().join() !== names.join())) throw new Error("the bundles export different names");
  const compiled = await precompile();
  writeFileSync(`${root}dist/mod.js`, entry(names, ["process.platform", "process.arch"], ["darwin", "win32", "arm64"], "", compiled ? [compiled] : []));
  writeFileSync(`${root}dist/deno.js`, entry(names, ["Deno.build.os", "Deno.build.arch"], ["darwin", "windows", "aarch64"], "deno-"));
}

if (process.argv[1] === new URL(import.meta.url).pathname) {
  if (process.argv[2] === "--bundles") {
    await bundles();
  } else if (process.argv[2] === "--node-cache") {
    await nodeCache(process.argv[3]);
  } else {
    // Quiet unless it fails: `npm pack --json` prints what it packed after this on standard output.
    writeDenoTypes();
    rmSync(`${root}dist`, { recursive: true, force: true });
    const self = new URL(import.meta.url).pathname;
    const ok = [
      [bin("tsc"), ["-p", "tsconfig.dist.json", "--emitDeclarationOnly"]],
      [bin("bun"), [self, "--bundles"]],
      // The cache of the bundle the Bun step precompiled, by npm's node.
      ...(precompiled() ? [[bin("node"), ["--no-warnings", ...NODE_CACHE_FLAGS, self, "--node-cache", precompiled()]]] : []),
    ].every(([command, args]) => {
      const result = sh(command, args, { cwd: root });
      // A step's warnings (the Node cache step's) on standard error, the rest only where it failed.
      if (result.status !== 0) process.stderr.write(`${result.stdout}${result.stderr}${result.error ?? ""}`);
      else process.stderr.write(result.stderr);
      return result.status === 0;
    });
    process.exit(ok ? 0 : 1);
  }
}
