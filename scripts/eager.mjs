// Deno's bundles with their functions compiled when the module is, not on their first call: Deno
// keeps a module's bytecode in its code cache (DENO_DIR), but only the bytecode V8 made while
// compiling the module, and V8 compiles a function lazily, on its first call, unless it is written
// as a parenthesized function expression (V8's PIFE heuristic). A first patch calls ~190 functions
// (~80 KB of source) that were each compiled on that call, ~3 ms on Deno; written this way they
// come compiled from the cache. The rewrite keeps what each function does: a top-level function
// declaration becomes `var f=(function(...){...});` moved to the top of the file (declarations are
// set before any statement runs, so every use still finds it), an expression or arrow gains
// parentheses, an object literal's method `m(...){...}` becomes `m:(function(...){...})` (its
// name comes from the key, so no self-binding shadows an outer `m`). Class members and nested
// declarations stay as they were: V8 has no such hint for them. Where each function starts and
// ends comes from V8 itself (Node's `--log-function-events` with `--no-lazy`, compiling the bundle
// without running it), and the source map moves with the text; V8 then compiles the result, which
// must hold the same functions. Node and Bun keep no code cache of a module, so their bundles stay
// lazy; they get theirs precompiled instead (scripts/build.mjs `precompile`).
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { sh } from "./steps.mjs";

/** Every function of the ES module `code` as V8 compiles it: [start, end), from its parameters to its end. */
function functionsOf(node, code) {
  const dir = mkdtempSync(join(tmpdir(), "redefine-eager-"));
  try {
    const log = join(dir, "v8.log");
    const compile = `new (require("node:vm").SourceTextModule)(require("node:fs").readFileSync(0, "utf8"), { identifier: "bundle" })`;
    const result = sh(node, [
      "--no-lazy", "--log-function-events", "--no-logfile-per-isolate", `--logfile=${log}`,
      "--experimental-vm-modules", "--no-warnings", "-e", compile,
    ], { input: code });
    if (result.status !== 0) throw new Error(`compiling the bundle for its functions failed: ${result.stderr}`);
    const lines = readFileSync(log, "utf8").split("\n").map((line) => line.split(","));
    const script = lines.find((f) => f[0] === "script-details" && f[2] === "bundle")?.[1];
    if (script === undefined) throw new Error("V8's log names no script 'bundle'");
    const seen = new Set();
    return lines
      .filter((f) => f[0] === "function" && f[1] === "interpreter" && f[2] === script)
      .map((f) => [Number(f[3]), Number(f[4])])
      .filter(([start, end]) => !(start === 0 && end === code.length) && !seen.has(`${start},${end}`) && seen.add(`${start},${end}`))
      .sort((a, b) => a[0] - b[0] || b[1] - a[1]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Throws unless each of `names` is bound in the module scope of `code`: V8 compiles it exporting
 * every one under a fresh name, which is an early error for a name bound only inside a block.
 */
function assertModuleScope(node, code, names) {
  const exports = names.map((name, i) => `${name} as __eager${i}`).join(",");
  const compile = `new (require("node:vm").SourceTextModule)(require("node:fs").readFileSync(0, "utf8"))`;
  const result = sh(node, ["--experimental-vm-modules", "--no-warnings", "-e", compile], { input: `${code}\nexport{${exports}};` });
  if (result.status !== 0) throw new Error(`a function to hoist is not of the module's own scope: ${result.stderr}`);
}

/** The end of the bracket opened at `at` (ignoring brackets in strings: parameters hold few). */
function closing(code, at) {
  for (let depth = 0, i = at; i < code.length; i++) {
    const c = code[i];
    if (c === '"' || c === "'" || c === "`") {
      for (i++; i < code.length && code[i] !== c; i++) if (code[i] === "\\") i++;
    } else if (c === "(" || c === "[" || c === "{") depth++;
    else if ((c === ")" || c === "]" || c === "}") && --depth === 0) return i + 1;
  }
  return -1;
}

/**
 * How one function is rewritten, or null where V8 has no hint for it: code[cut, from) is dropped,
 * code[from, to) (with its own functions rewritten) is written between `head` and `tail`, in place
 * or, `hoisted`, at the top of the file. `within` tells whether another function encloses it.
 */
function rewriteOf(code, [start, end], within) {
  const before = code.slice(Math.max(0, start - 200), start);
  const keyword = /((?:async\s*)?function\s*\*?)\s*([\w$]*)\s*$/.exec(before);
  if (keyword) {
    const from = start - before.length + keyword.index;
    // An exported declaration stays: the bundler exports by one `export {...}` at the end.
    if (/export\s+(default\s+)?$/.test(before.slice(0, keyword.index))) return null;
    if (from > 0 && !";{}\n".includes(code[from - 1])) return { cut: from, from, to: end, head: "(", tail: ")" };
    if (within || !keyword[2]) return null;
    return { cut: from, from: start, to: end, head: `var ${keyword[2]}=(${keyword[1].trimEnd()}`, tail: ");", hoisted: true };
  }
  if (/^[\w$]+=>/.test(code.slice(start, start + 200)) || (code[start] === "(" && code.startsWith("=>", closing(code, start)))) {
    const from = /async\s*$/.test(before) ? start - before.length + before.search(/async\s*$/) : start;
    return { cut: from, from, to: end, head: "(", tail: ")" };
  }
  const method = /([{,])([\w$]+)$/.exec(before);
  if (!method || ["get", "set", "static", "async", "constructor"].includes(method[2])) return null;
  const name = start - method[2].length;
  if (method[1] === "{" && /class(\s+[\w$]+)?(\s+extends\s+[\w$.]+)?$/.test(code.slice(Math.max(0, name - 201), name - 1))) return null;
  return { cut: start, from: start, to: end, head: ":(function", tail: ")" };
}

/**
 * `code` rewritten by `rewrites` (sorted by `cut`, nested or apart, never crossing), as pieces in
 * the output's order: strings of new text and [from, to) ranges of the original.
 */
function rewritten(code, rewrites) {
  const hoisted = [];
  const build = (from, to, list) => {
    const pieces = [];
    let at = from;
    for (let i = 0; i < list.length;) {
      const r = list[i];
      let j = i + 1;
      while (j < list.length && list[j].cut < r.to) j++;
      if (at < r.cut) pieces.push([at, r.cut]);
      const written = [r.head, ...build(r.from, r.to, list.slice(i + 1, j)), r.tail];
      (r.hoisted ? hoisted : pieces).push(...written);
      at = r.to;
      i = j;
    }
    if (at < to) pieces.push([at, to]);
    return pieces;
  };
  // The hoisted functions go after the first line (`// @bun`), before every statement.
  const firstLine = code.indexOf("\n") + 1;
  const [head, ...rest] = build(0, code.length, rewrites);
  if (!Array.isArray(head) || head[0] !== 0 || head[1] < firstLine) throw new Error("the bundle does not start with a line of its own");
  return [[0, firstLine], ...hoisted, [firstLine, head[1]], ...rest];
}

const BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/** A source map's segments: the generated line and column, and the rest (source, line, column, name). */
export function segmentsOf(mappings) {
  const segments = [];
  const state = [0, 0, 0, 0];
  mappings.split(";").forEach((line, number) => {
    let column = 0;
    for (const text of line.split(",")) {
      if (!text) continue;
      const values = [];
      for (let i = 0, value = 0, shift = 0; i < text.length; i++) {
        const digit = BASE64.indexOf(text[i]);
        value += (digit & 31) * 2 ** shift;
        shift += 5;
        if (!(digit & 32)) {
          values.push(value % 2 ? -(value - 1) / 2 : value / 2);
          value = shift = 0;
        }
      }
      column += values[0];
      const rest = values.slice(1).map((delta, k) => (state[k] += delta));
      segments.push({ line: number, column, rest });
    }
  });
  return segments;
}

/** One signed number in base-64 VLQ. */
function vlq(value) {
  let v = value < 0 ? -value * 2 + 1 : value * 2, text = "";
  do {
    const digit = v % 32;
    v = Math.floor(v / 32);
    text += BASE64[v > 0 ? digit + 32 : digit];
  } while (v > 0);
  return text;
}

/** The `mappings` text of segments sorted by line and column, as segmentsOf gives them. */
export function mappingsOf(segments) {
  const state = [0, 0, 0, 0];
  const lines = [];
  for (const s of segments) {
    while (lines.length <= s.line) lines.push({ column: 0, texts: [] });
    const line = lines[s.line];
    line.texts.push(vlq(s.column - line.column) + s.rest.map((v, k) => vlq(v - state[k])).join(""));
    line.column = s.column;
    s.rest.forEach((v, k) => (state[k] = v));
  }
  return lines.map((l) => l.texts.join(",")).join(";");
}

function lineStarts(text) {
  const starts = [0];
  for (let i = text.indexOf("\n"); i >= 0; i = text.indexOf("\n", i + 1)) starts.push(i + 1);
  return starts;
}

/** The map of the pieces' output, from the map of `code`: each segment moves with its text. */
function movedMap(code, pieces, map) {
  const from = lineStarts(code);
  const moves = [];
  let out = "";
  for (const piece of pieces) {
    if (typeof piece === "string") out += piece;
    else {
      moves.push([piece[0], piece[1], out.length]);
      out += code.slice(piece[0], piece[1]);
    }
  }
  moves.sort((a, b) => a[0] - b[0]);
  const to = lineStarts(out);
  const lineOf = (starts, at) => {
    let lo = 0, hi = starts.length - 1;
    while (lo < hi) {
      const mid = Math.ceil((lo + hi) / 2);
      if (starts[mid] <= at) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  };
  let m = 0;
  const segments = [];
  for (const s of segmentsOf(map.mappings)) {
    const at = from[s.line] + s.column;
    while (m + 1 < moves.length && moves[m + 1][0] <= at) m++;
    const [start, end, into] = moves[m];
    if (at < start || at >= end) continue;
    const moved = into + at - start, line = lineOf(to, moved);
    segments.push({ line, column: moved - to[line], rest: s.rest });
  }
  segments.sort((a, b) => a.line - b.line || a.column - b.column);
  return { code: out, map: { ...map, mappings: mappingsOf(segments) } };
}

/** `code` (a bundle) and its source map with every function V8 can be told of compiled eagerly. */
export function eager(node, code, map) {
  const functions = functionsOf(node, code);
  const rewrites = [];
  const open = [];
  for (const f of functions) {
    while (open.length && open.at(-1)[1] <= f[0]) open.pop();
    const rewrite = rewriteOf(code, f, open.length > 0);
    open.push(f);
    if (rewrite) rewrites.push(rewrite);
  }
  rewrites.sort((a, b) => a.cut - b.cut || b.to - a.to);
  // Each hoisted name must be a function of the module's own scope (a function declared in a
  // top-level block is the block's: moving it out would change its scope), once.
  const names = rewrites.filter((r) => r.hoisted).map((r) => /^var ([\w$]+)=/.exec(r.head)[1]);
  if (new Set(names).size !== names.length) throw new Error("two hoisted functions share a name");
  assertModuleScope(node, code, names);
  const moved = movedMap(code, rewritten(code, rewrites), map);
  // The rewrite must compile (V8 says so before any runtime loads it: npm test runs only this
  // system's bundle) and hold the same functions, no more, no fewer.
  const after = functionsOf(node, moved.code).length;
  if (after !== functions.length) throw new Error(`the eager bundle has ${after} functions where the bundle has ${functions.length}`);
  return moved;
}
