// Deno's eager bundles (scripts/eager.mjs): the rewrite keeps what a module does — a function
// used before its declaration, a method beside an outer function of its own name, arrows, async
// and generator functions, a class with a nested declaration — and its source map still points
// each token where it pointed before.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { assert, test } from "./harness.ts";

interface Segment {
  line: number;
  column: number;
  rest: number[];
}
interface SourceMap {
  version: number;
  sources: string[];
  names: string[];
  mappings: string;
}
// A plain script for Node: loaded by a computed specifier, so neither type checker asks for its types.
const rewrite: {
  eager(node: string, code: string, map: SourceMap): { code: string; map: SourceMap };
  segmentsOf(mappings: string): Segment[];
  mappingsOf(segments: Segment[]): string;
} = await import("../scripts/eager.mjs" as string);

const node = join(new URL("..", import.meta.url).pathname, "node_modules", ".bin", "node");

// Written as the bundler writes: minified, one statement after another.
const MODULE = [
  "// @bun",
  'var early=used();function used(){return helper(2)+1}function helper(n){return n*10}function open(){return"outer"}' +
  "var api={open(x){return open()+x},k:1,twice(a){return[a,a].map((v)=>v*2)}};" +
  "var arrow=(a,b)=>a+b,one=x=>x+1;async function later(v){return v}function*gen(){yield 1;yield 2}" +
  "class K{constructor(v){this.v=v}get double(){return this.v*2}m(){return inner();function inner(){return\"inner\"}}}" +
  "var expr=function named(n){return n?named(n-1)+1:0};" +
  "export async function result(){return{early,open:api.open(\"!\"),twice:api.twice(3),arrow:arrow(1,2),one:one(1)," +
  "later:await later(5),gen:[...gen()],k:new K(4).double,m:new K(0).m(),expr:expr(3)," +
  "names:[used.name,api.open.name,arrow.name,one.name,later.name,gen.name,K.name,expr.name]}}",
  "",
].join("\n");

/** Tokens of MODULE whose every position is mapped to source line i (the i-th token), column 0. */
const TOKENS = ["helper(2)", '"outer"', "open()+x", "v*2", "a+b", "x+1", "yield 2", "this.v*2", '"inner"', "named(n-1)", "api.twice(3)"];

function mapOf(code: string): SourceMap {
  const lines = code.split("\n");
  const segments: Segment[] = [];
  TOKENS.forEach((token, i) => {
    const line = lines.findIndex((text) => text.includes(token));
    segments.push({ line, column: lines[line]!.indexOf(token), rest: [0, i, 0] });
  });
  segments.sort((a, b) => a.line - b.line || a.column - b.column);
  return { version: 3, sources: ["module.ts"], names: [], mappings: rewrite.mappingsOf(segments) };
}

test("eager bundles: the rewritten module does what the module did, its functions as expressions", async () => {
  const { code } = rewrite.eager(node, MODULE, mapOf(MODULE));
  for (const made of ["var used=(function(", "var helper=(function(", "open:(function(", "((a,b)=>a+b)", "(x=>x+1)",
    "var later=(async function(", "var gen=(function*(", "(function named(n)"]) {
    assert.ok(code.includes(made), `the rewrite has ${made}`);
  }
  assert.ok(code.includes("m(){return inner();function inner()"), "class members and nested declarations stay");
  const dir = mkdtempSync(join(tmpdir(), "redefine-eager-test-"));
  try {
    writeFileSync(join(dir, "before.mjs"), MODULE);
    writeFileSync(join(dir, "after.mjs"), code);
    const before = await (await import(join(dir, "before.mjs"))).result();
    const after = await (await import(join(dir, "after.mjs"))).result();
    assert.deepEqual(after, before);
    assert.deepEqual(before.names, ["used", "open", "arrow", "one", "later", "gen", "K", "named"]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("eager bundles: every mapped token keeps its place in the source map", () => {
  const { code, map } = rewrite.eager(node, MODULE, mapOf(MODULE));
  const lines = code.split("\n");
  const found = rewrite.segmentsOf(map.mappings).map((s) => [lines[s.line]!.slice(s.column), s.rest[1]] as const);
  assert.equal(found.length, TOKENS.length);
  for (const [text, line] of found) assert.ok(text.startsWith(TOKENS[line!]!), `source line ${line} maps to ${text.slice(0, 20)}`);
});

test("eager bundles: a function declared in a top-level block is refused, not moved out of its block", () => {
  // Called, so V8 compiles it and lists it (an unused one it lists not, and it stays as it is).
  const blocked = "// @bun\nif(globalThis.x){function onlyHere(){return 1}onlyHere()}export const v=1;\n";
  const empty: SourceMap = { version: 3, sources: ["module.ts"], names: [], mappings: "" };
  assert.throws(() => rewrite.eager(node, blocked, empty), /not of the module's own scope/);
});
