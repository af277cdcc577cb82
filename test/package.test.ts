// The npm package as its users get it: `npm pack`'s tarball (prepack compiles dist/), installed by
// file path into a fresh project of each runtime in a temporary folder, imported by its bare name,
// redefining libc's getpid natively to getppid, checked through the runtime's own FFI, restored;
// and a strict Node TypeScript project type-checking against the declarations it ships.
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { assert, test } from "./harness.ts";

const root = new URL("..", import.meta.url).pathname;
const bin = (name: string) => join(root, "node_modules", ".bin", name);
const NAME = "@redefine/redefine";

/** Runs `command` in `cwd`, failing the test with its output when it fails; its standard output. */
function run(command: string, args: string[], cwd: string): string {
  const result = spawnSync(command, args, { cwd, encoding: "utf8", env: { ...process.env, NO_COLOR: "1" } });
  assert.equal(result.status, 0, `${command} ${args.join(" ")}:\n${result.stdout}${result.stderr}${result.error ?? ""}`);
  return result.stdout;
}

let packed: { dir: string; tarball: string } | undefined;

/** The tarball of this checkout, packed once per test process into a folder removed at exit. */
function tarball(): { dir: string; tarball: string } {
  if (packed) return packed;
  const dir = mkdtempSync(join(tmpdir(), "redefine-package-"));
  process.once("exit", () => rmSync(dir, { recursive: true, force: true }));
  const [info] = JSON.parse(run("npm", ["pack", "--json", "--pack-destination", dir], root));
  packed = { dir, tarball: join(dir, info.filename) };
  return packed;
}

/** A fresh project of its own, with only a package.json, in the tarball's folder. */
function project(runtime: string): string {
  const dir = join(tarball().dir, runtime);
  mkdirSync(dir);
  writeFileSync(join(dir, "package.json"), JSON.stringify({ name: `${runtime}-consumer`, private: true, type: "module" }));
  return dir;
}

/**
 * The consumer's check, after `binding` has defined `getpid` and `getppid` through the runtime's
 * own FFI: the bare import resolves into the installed package, and the patch makes getpid answer
 * getppid's value until it is restored.
 */
function check(binding: string): string {
  return `import { redefine } from "${NAME}";
${binding}
const pid = getpid(), parent = getppid();
if (pid === parent) throw new Error("getpid and getppid agree before any patch");
const patch = redefine({ symbol: "getpid", parameters: [], result: "i32" }, { symbol: "getppid" });
const patched = getpid();
patch.restore();
console.log(JSON.stringify({ resolved: import.meta.resolve("${NAME}"), pid, parent, patched, restored: getpid() }));
`;
}

function assertRedefined(output: string, entry: string): void {
  const result = JSON.parse(output.trim().split("\n").pop()!);
  assert.ok(result.resolved.endsWith(`/node_modules/${NAME}/${entry}`), `${NAME} resolved to ${result.resolved}`);
  assert.equal(result.patched, result.parent, "the patched getpid answers getppid's value");
  assert.equal(result.restored, result.pid, "restored, getpid answers the process id again");
}

test("package: the tarball installs into a fresh Bun project; a bare import redefines getpid natively", () => {
  const dir = project("bun");
  run(bin("bun"), ["add", tarball().tarball], dir);
  writeFileSync(
    join(dir, "check.ts"),
    check(`import { dlopen } from "bun:ffi";
const { getpid, getppid } = dlopen("libc.so.6", {
  getpid: { args: [], returns: "i32" },
  getppid: { args: [], returns: "i32" },
}).symbols;`),
  );
  // The "bun" export condition: the bundle, like every runtime's (dist/mod.js loads this system's
  // dist/<os>-<cpu>.js): Bun parses one file instead of the sources' fifty, ~3 ms less start-up.
  assertRedefined(run(bin("bun"), ["check.ts"], dir), "dist/mod.js");
});

test("package: the tarball installs into a fresh Deno project with npm; a bare import redefines getpid natively", () => {
  const dir = project("deno");
  run("npm", ["install", "--no-audit", "--no-fund", "--offline", tarball().tarball], dir);
  writeFileSync(
    join(dir, "check.ts"),
    check(`const { getpid, getppid } = Deno.dlopen("libc.so.6", {
  getpid: { parameters: [], result: "i32" },
  getppid: { parameters: [], result: "i32" },
}).symbols;`),
  );
  // Deno strips no types under node_modules: its "deno" condition is the compiled JavaScript,
  // dist/deno.js, which picks the bundle by Deno.build (its first touch of `process` costs ~12 ms).
  assertRedefined(run(bin("deno"), ["run", "--allow-ffi", "--allow-read", "check.ts"], dir), "dist/deno.js");
});

test("package: a strict Node TypeScript project (nodenext) type-checks against the compiled declarations", () => {
  const dir = project("tsc-node");
  run("npm", ["install", "--no-audit", "--no-fund", "--offline", tarball().tarball], dir);
  writeFileSync(
    join(dir, "consumer.ts"),
    `import { redefine, RedefineError } from "${NAME}";
const labs = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => x * 2n);
const real: bigint = labs.original(-3n);
labs.restore();
export const answer: [bigint, string] = [real, RedefineError.name];
`,
  );
  const compilerOptions = {
    module: "nodenext",
    target: "esnext",
    strict: true,
    noUncheckedIndexedAccess: true,
    exactOptionalPropertyTypes: true,
    noEmit: true,
    types: ["node"],
    typeRoots: [join(root, "node_modules", "@types")],
  };
  writeFileSync(join(dir, "tsconfig.json"), JSON.stringify({ compilerOptions, files: ["consumer.ts"] }));
  const trace = run(bin("tsc"), ["-p", dir, "--traceResolution"], dir);
  // The "node" export condition's declarations, not the sources.
  assert.match(trace, new RegExp(`'${NAME}' was successfully resolved to '[^']*/node_modules/${NAME}/dist/mod\\.d\\.ts'`));
});

// Node 26 (node:ffi) comes with platform/node.ts and the `node` devDependency; until both are here
// the Node half reports itself skipped.
const node = bin("node");
const nodeReady = existsSync(join(root, "platform", "node.ts")) && existsSync(node);

test("package: the tarball installs into a fresh Node project; a bare import redefines getpid natively", () => {
  const dir = project("node");
  run("npm", ["install", "--no-audit", "--no-fund", "--offline", tarball().tarball], dir);
  writeFileSync(
    join(dir, "check.mjs"),
    check(`import process from "node:process";
const libc = new (process.getBuiltinModule("node:ffi").DynamicLibrary)("libc.so.6");
const getpid = libc.getFunction("getpid", { arguments: [], return: "int32" });
const getppid = libc.getFunction("getppid", { arguments: [], return: "int32" });`),
  );
  // The "node" export condition: the JavaScript compiled at pack time.
  assertRedefined(run(node, ["check.mjs"], dir), "dist/mod.js");
}, { skip: nodeReady ? undefined : "Node support (platform/node.ts, node 26 from npm) is not here yet" });
