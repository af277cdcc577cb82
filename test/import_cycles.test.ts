// The import-circle check of `npm test` (scripts/import_cycles.mjs): which statements are edges, and
// that a circle of any length is found while a diamond is not.
import { assert, test } from "./harness.ts";

type Graph = Map<string, string[]>;
interface Circle {
  files: string[];
  path: string[];
}
// A plain script for Node: loaded by a computed specifier, so neither type checker asks for its types.
const check: { importsOf(source: string): string[]; cycles(graph: Graph): Circle[] } = await import(
  "../scripts/import_cycles.mjs" as string
);

test("import circles: every kind of import is an edge; comments and other strings are not", () => {
  const source = [
    `import { a } from "./a.ts";`,
    `import type { B } from './b.ts';`,
    `import "./c.ts";`,
    `export { d } from "./d.ts";`,
    `export type { E } from "./e.ts";`,
    `export * from "./f.ts";`,
    `import {`,
    `  g,`,
    `  type G,`,
    `} from "./g.ts";`,
    `const h = await import("./h.ts");`,
    `let i: typeof import("./i.ts");`,
    `/**`,
    ` * import { x } from "./commented.ts";`,
    ` */`,
    `// import { y } from "./line_comment.ts";`,
    `const text = "import { z } from './in_a_string.ts'";`,
  ].join("\n");
  assert.deepEqual(check.importsOf(source), [
    "./a.ts", "./b.ts", "./c.ts", "./d.ts", "./e.ts", "./f.ts", "./g.ts", "./h.ts", "./i.ts",
  ]);
});

test("import circles: a circle of three and a self-import are found, a diamond is not", () => {
  const graph: Graph = new Map([
    ["a", ["b", "d"]],
    ["b", ["c"]],
    ["c", ["a"]],
    ["d", ["e", "f"]],
    ["e", ["g"]],
    ["f", ["g"]],
    ["g", []],
    ["h", ["h"]],
  ]);
  assert.deepEqual(check.cycles(graph), [
    { files: ["a", "b", "c"], path: ["a", "b", "c", "a"] },
    { files: ["h"], path: ["h", "h"] },
  ]);
  assert.deepEqual(check.cycles(new Map([["a", ["b"]], ["b", []]])), []);
});
