// npm test's strict consumer type check: a project that imports "@redefine/redefine" by name (the
// "types" export condition brings in the TypeScript sources, which the consumer's checker then
// checks with its own settings) compiled as a strict consumer would: `bun init`'s settings plus
// exactOptionalPropertyTypes, once with bun-types and once with @types/node, neither with Deno's
// declarations. The project is written into .cache/consumer/, inside the package, so that the
// bare name resolves to this checkout. Exits 1 on any type error, or when the replacement that
// calls its own patch's original without an annotation compiles: the README says it needs one.
import { mkdirSync, writeFileSync } from "node:fs";
import { echoed, sh } from "./steps.mjs";

const root = new URL("..", import.meta.url).pathname;
const dir = `${root}.cache/consumer/`;

/** What a consumer writes: the documented API, its inferred types relied on. */
const CONSUMER = `import { redefine, redefineAll, RedefineError, restoreAll, transaction, wrap } from "@redefine/redefine";
import type { NativeType, Patch, RedefineErrorCode, Signature, Target } from "@redefine/redefine";

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
{
  // A replacement calling the original: wrap() infers it all; the plain form needs its annotation.
  using doubled = wrap({ symbol: "labs", parameters: ["i64"], result: "i64" }, (original) => (x) => original(x) * 2n);
  const twice: bigint = doubled.original(-3n);
  const named: Target<[n: "i64"], "i64"> = { symbol: "labs", parameters: ["i64"], result: "i64" };
  using again = wrap(named, (original) => (n) => original(n) + 1n);
  const annotated: Patch<readonly ["i32"], "i32"> = redefine(
    { symbol: "abs", parameters: ["i32"], result: "i32" },
    (x) => annotated.original(x) + 1,
  );
  annotated.restore();
  console.log(twice, again.original(1n));
}
const [parent, absolute] = redefineAll([
  [{ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" }],
  [{ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => -x],
]);
const ids: [number, bigint] = [parent.original(), absolute.original(1n)];
transaction(() => {
  redefine({ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" });
});
restoreAll();
try {
  redefine({ symbol: "no_such_function", parameters: [], result: "void" }, () => {});
} catch (error) {
  const code: RedefineErrorCode | undefined = error instanceof RedefineError ? error.code : undefined;
  console.log(real, code, ids);
}
`;

/** The plain form without its annotation: TS7022, which wrap() is there to avoid. */
const UNANNOTATED = `import { redefine } from "@redefine/redefine";
const doubled = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => doubled.original(x) * 2n);
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
writeFileSync(`${dir}unannotated.ts`, UNANNOTATED);

function tscArgs(file, types) {
  const config = `${dir}tsconfig.${file}.${types[0]}.json`;
  writeFileSync(config, JSON.stringify({ compilerOptions: { ...STRICT, types }, files: [`${file}.ts`] }, null, 2));
  return [`${root}node_modules/.bin/tsc`, ["-p", config], { cwd: root }];
}

let failed = false;
for (const [name, types] of [["bun-types", ["bun-types"]], ["@types/node", ["node"]]]) {
  console.log(`--- a strict consumer with ${name}`);
  if (!echoed(...tscArgs("consumer", types)).ok) failed = true;
}
console.log("--- the plain form calling its patch's original, unannotated: TS7022 expected");
const unannotated = sh(...tscArgs("unannotated", ["bun-types"]));
if (/error TS7022/.test(unannotated.stdout)) {
  console.log("TS7022, as the README's API section says");
} else {
  console.log(`expected TS7022 (the README says this form needs an annotation), got:\n${unannotated.stdout}`);
  failed = true;
}
process.exit(failed ? 1 : 0);
