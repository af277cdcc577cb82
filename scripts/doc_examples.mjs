// npm test's check that every export of mod.ts has a JSDoc `@example` (the house style, and JSR's
// documentation score); `deno test --doc` then type-checks them. Reads `deno doc --json mod.ts`;
// exits 1 naming the exports without one.
import { sh } from "./steps.mjs";

const root = new URL("..", import.meta.url).pathname;
const result = sh(`${root}node_modules/.bin/deno`, ["doc", "--json", "mod.ts"], { cwd: root });
if (result.status !== 0) {
  console.log(result.stderr);
  process.exit(1);
}
const { nodes } = JSON.parse(result.stdout);
const symbols = Object.values(nodes).flatMap((file) => file.symbols ?? []);
const hasExample = (symbol) =>
  symbol.declarations.some((d) => (d.jsDoc?.tags ?? []).some((tag) => tag.kind === "example"));
const missing = symbols.filter((symbol) => !hasExample(symbol)).map((symbol) => symbol.name);
console.log(`${symbols.length} exports, ${symbols.length - missing.length} with an @example`);
if (missing.length) console.log(`without one: ${missing.join(", ")}`);
process.exit(missing.length ? 1 : 0);
