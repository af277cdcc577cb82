// No import circles among the files of src/ and platform/: every relative import, export-from,
// type-only import and `import("…")` is an edge; a strongly connected set of files is a circle.
// `node scripts/import_cycles.mjs` lists each circle and exits 1 when there is one.
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";

const root = new URL("..", import.meta.url).pathname;

/**
 * `source` without its comments, strings kept: the JSDoc examples import the package's entry,
 * which is no edge of the file holding them. Regular-expression literals are not told apart from
 * division; a `//` or a quote inside one would need this to learn them.
 */
function withoutComments(source) {
  let out = "";
  for (let i = 0; i < source.length; i++) {
    const c = source[i];
    if (c === "/" && source[i + 1] === "/") {
      i = source.indexOf("\n", i);
      if (i < 0) break;
      out += "\n";
    } else if (c === "/" && source[i + 1] === "*") {
      const end = source.indexOf("*/", i + 2);
      i = end < 0 ? source.length : end + 1;
      out += " ";
    } else if (c === '"' || c === "'" || c === "`") {
      let j = i + 1;
      while (j < source.length && source[j] !== c) j += source[j] === "\\" ? 2 : 1;
      out += source.slice(i, j + 1);
      i = j;
    } else {
      out += c;
    }
  }
  return out;
}

/** The module specifiers `source` imports or re-exports from, in order, relative or not. */
export function importsOf(source) {
  const code = withoutComments(source);
  const specifiers = [];
  // `import … from "x"`, `import "x"`, `export … from "x"`, `import type … from "x"`.
  const statement = /(?:^|[;\s}])(?:import|export)\s+(?:type\s+)?(?:[\w*{}\s,$]*?\s+from\s*)?(["'])([^"'\n]+)\1/g;
  // `import("x")` and `typeof import("x")`.
  const call = /\bimport\s*\(\s*(["'])([^"'\n]+)\1/g;
  for (const pattern of [statement, call]) {
    for (const match of code.matchAll(pattern)) specifiers.push(match[2]);
  }
  return specifiers;
}

/**
 * The circles of `graph` (file → the files it imports): each strongly connected set of two or
 * more files, or a file importing itself, as `{ files, path }` with one closed path through them
 * (`[a, b, a]`). Tarjan's algorithm.
 */
export function cycles(graph) {
  const index = new Map(), low = new Map(), stack = [], onStack = new Set(), found = [];
  let next = 0;
  function visit(file) {
    index.set(file, next);
    low.set(file, next++);
    stack.push(file);
    onStack.add(file);
    for (const to of graph.get(file) ?? []) {
      if (!index.has(to)) {
        visit(to);
        low.set(file, Math.min(low.get(file), low.get(to)));
      } else if (onStack.has(to)) {
        low.set(file, Math.min(low.get(file), index.get(to)));
      }
    }
    if (low.get(file) !== index.get(file)) return;
    const members = [];
    let member;
    do {
      member = stack.pop();
      onStack.delete(member);
      members.push(member);
    } while (member !== file);
    if (members.length > 1 || (graph.get(file) ?? []).includes(file)) {
      found.push({ files: members.sort(), path: pathThrough(graph, new Set(members)) });
    }
  }
  for (const file of [...graph.keys()].sort()) if (!index.has(file)) visit(file);
  return found;
}

/** One closed path inside the strongly connected set `members`, from its first file in order. */
function pathThrough(graph, members) {
  const start = [...members].sort()[0];
  // Breadth-first from start back to start, inside the set: the shortest circle through it.
  const previous = new Map();
  const queue = [start];
  while (queue.length) {
    const file = queue.shift();
    for (const to of graph.get(file) ?? []) {
      if (!members.has(to)) continue;
      if (to === start) {
        const path = [start];
        for (let at = file; at !== start; at = previous.get(at)) path.unshift(at);
        return [start, ...path];
      }
      if (!previous.has(to)) {
        previous.set(to, file);
        queue.push(to);
      }
    }
  }
  return [start, start];
}

function sourceFiles(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return sourceFiles(path);
    return /\.(ts|mts|js|mjs)$/.test(entry.name) ? [path] : [];
  });
}

/** The import graph of the files under `dirs` (paths relative to the checkout), edges among them only. */
export function importGraph(dirs) {
  const files = dirs.flatMap((dir) => sourceFiles(join(root, dir)));
  const known = new Set(files);
  const graph = new Map();
  for (const file of files) {
    const edges = importsOf(readFileSync(file, "utf8"))
      .filter((specifier) => specifier.startsWith("."))
      .map((specifier) => resolve(dirname(file), specifier))
      .filter((target) => known.has(target));
    graph.set(relative(root, file), [...new Set(edges.map((target) => relative(root, target)))]);
  }
  return graph;
}

if (process.argv[1] && resolve(process.argv[1]) === new URL(import.meta.url).pathname) {
  const dirs = ["src", "platform"].filter((dir) => existsSync(join(root, dir)));
  const graph = importGraph(dirs);
  const found = cycles(graph);
  for (const { files, path } of found) {
    console.log(`import circle among ${files.length} files: ${files.join(", ")}\n  for one: ${path.join(" → ")}`);
  }
  const edges = [...graph.values()].reduce((n, e) => n + e.length, 0);
  console.log(`${graph.size} files, ${edges} imports, ${found.length} circle${found.length === 1 ? "" : "s"}`);
  process.exit(found.length ? 1 : 0);
}
