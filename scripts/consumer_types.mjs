// npm test's strict consumer type check: a project that imports "@redefine/redefine" by name (the
// "types" export condition brings in the TypeScript sources, which the consumer's checker then
// checks with its own settings) compiled as a strict consumer would: `bun init`'s settings plus
// exactOptionalPropertyTypes, once with bun-types and once with @types/node, neither with Deno's
// declarations. The project is written into .cache/consumer/, inside the package, so that the
// bare name resolves to this checkout. Exits 1 on any type error.
import { mkdirSync, writeFileSync } from "node:fs";
import { echoed } from "./steps.mjs";

const root = new URL("..", import.meta.url).pathname;
const dir = `${root}.cache/consumer/`;

/** What a consumer writes: the documented API, its inferred types relied on. */
const CONSUMER = `import { redefine, RedefineError, restoreAll, transaction } from "@redefine/redefine";
import type { NativeType, RedefineErrorCode, Signature } from "@redefine/redefine";

const abs: Signature = { parameters: ["i64"], result: "i64" };
const types: NativeType[] = [...abs.parameters, abs.result];
{
  using pid = redefine({ symbol: "getpid", library: "libc.so.6", parameters: [], result: "i32" }, () => 4242);
  const address: bigint = pid.address;
  const answer: number = pid.original();
  console.log(address, answer, types);
}
const labs = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => x * 2n);
const real: bigint = labs.original(-3n);
labs.restore();
transaction(() => {
  redefine({ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" });
});
restoreAll();
try {
  redefine({ symbol: "no_such_function", parameters: [], result: "void" }, () => {});
} catch (error) {
  const code: RedefineErrorCode | undefined = error instanceof RedefineError ? error.code : undefined;
  console.log(real, code);
}
`;

/** bun init's compiler options, and the strictest optional one it leaves out. */
const STRICT = {
  lib: ["ESNext"],
  target: "ESNext",
  module: "Preserve",
  moduleDetection: "force",
  allowJs: true,
  moduleResolution: "bundler",
  allowImportingTsExtensions: true,
  verbatimModuleSyntax: true,
  noEmit: true,
  strict: true,
  skipLibCheck: true,
  noFallthroughCasesInSwitch: true,
  noUncheckedIndexedAccess: true,
  noImplicitOverride: true,
  exactOptionalPropertyTypes: true,
};

mkdirSync(dir, { recursive: true });
writeFileSync(`${dir}consumer.ts`, CONSUMER);
let failed = false;
for (const [name, types] of [["bun-types", ["bun-types"]], ["@types/node", ["node"]]]) {
  const config = `${dir}tsconfig.${types[0]}.json`;
  writeFileSync(config, JSON.stringify({ compilerOptions: { ...STRICT, types }, files: ["consumer.ts"] }, null, 2));
  console.log(`--- a strict consumer with ${name}`);
  if (!echoed(`${root}node_modules/.bin/tsc`, ["-p", config], { cwd: root }).ok) failed = true;
}
process.exit(failed ? 1 : 0);
