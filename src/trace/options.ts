/**
 * The trace command's command line: `parseOptions()` turns the arguments into `TraceOptions`, or
 * throws a `UsageError` saying what is wrong; `USAGE` is the help text. Pure: no I/O here.
 */
import { checkSignature } from "../signature.ts";
import type { NativeType } from "../signature.ts";
import { RedefineError } from "../errors.ts";

/** A library to trace and the globs that pick its exported functions. */
export interface LibraryOption {
  /** The library's file name as the loader lists it (`libz.so.1`) or a path. */
  readonly library: string;
  /** Globs over the names of its exports (`*` any run of characters, `?` one); any matches. */
  readonly match: readonly string[];
}

/** A function whose calls are logged with their arguments and result. */
export interface SignatureOption {
  readonly symbol: string;
  readonly parameters: readonly NativeType[];
  readonly result: NativeType;
}

/** What the command was asked to do. */
export interface TraceOptions {
  readonly libraries: readonly LibraryOption[];
  /** Only calls from these libraries are traced (their import slots); empty: every caller. */
  readonly callers: readonly string[];
  readonly signatures: readonly SignatureOption[];
  /** Count only: no timing, so no return address is swapped. */
  readonly countOnly: boolean;
  readonly json: string | null;
  readonly svg: string | null;
  readonly help: boolean;
  /** The script to run, and its own arguments. */
  readonly script: string | null;
  readonly args: readonly string[];
}

/** A command line that cannot be run as given. */
export class UsageError extends Error {
  override name = "UsageError";
}

/** The help text. */
export const USAGE = `redefine-trace: count and time the calls a script makes into native libraries.

usage: redefine-trace [options] -- script.ts [args...]
  deno run -A jsr:@redefine/redefine/trace [options] -- script.ts [args...]
  bunx redefine-trace [options] -- script.ts [args...]

options:
  --library LIB        a library to trace (loaded first when it is not yet); repeatable
  --match GLOBS        comma-separated globs over LIB's exported functions, for the --library
                       before it (default: '*'), e.g. 'crc32*,deflate*'
  --callers LIB        trace only the calls LIB makes (through its import slots); repeatable
  --signature SIG      also log every call of a function with its arguments and result, e.g.
                       'crc32(u64,pointer,u32):u64'; repeatable
  --count-only         count calls without timing them
  --json FILE          write the results as JSON
  --svg FILE           write a bar chart of the 30 functions that took the most time
  -h, --help           show this text

At exit, a table on stderr: function, calls, total time, mean time, share of the traced time.`;

/** The options in `argv` (the arguments after the command's own name). */
export function parseOptions(argv: readonly string[]): TraceOptions {
  const libraries: { library: string; match: string[] }[] = [];
  const callers: string[] = [];
  const signatures: SignatureOption[] = [];
  let countOnly = false, help = false;
  let json: string | null = null, svg: string | null = null;
  let i = 0;
  const value = (flag: string): string => {
    const v = argv[++i];
    if (v === undefined || v === "--") throw new UsageError(`${flag} needs a value.`);
    return v;
  };
  // An empty value (`--json=`) names no file and no library: refused like a missing one.
  const nonEmpty = (flag: string, v: string): string => {
    if (v === "") throw new UsageError(`${flag} needs a value, not an empty one.`);
    return v;
  };
  for (; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--") {
      i++;
      break;
    }
    // `--flag=value` as well as `--flag value`.
    const equals = arg.startsWith("--") ? arg.indexOf("=") : -1;
    const [flag, inline] = equals > 0 ? [arg.slice(0, equals), arg.slice(equals + 1)] : [arg, undefined];
    const take = () => nonEmpty(flag, inline ?? value(flag));
    switch (flag) {
      case "--library":
        libraries.push({ library: take(), match: [] });
        break;
      case "--match": {
        const globs = take().split(",").map((g) => g.trim()).filter((g) => g !== "");
        const last = libraries.at(-1);
        if (!last) throw new UsageError("--match applies to the --library before it: give --library LIB first.");
        last.match.push(...globs);
        break;
      }
      case "--callers":
        callers.push(take());
        break;
      case "--signature":
        signatures.push(parseSignature(take()));
        break;
      case "--count-only":
        countOnly = true;
        break;
      case "--json":
        json = take();
        break;
      case "--svg":
        svg = take();
        break;
      case "-h":
      case "--help":
        help = true;
        break;
      default:
        if (!arg.startsWith("-")) {
          // The script without a `--` before it.
          return finish(argv.slice(i));
        }
        throw new UsageError(`unknown option '${arg}'.`);
    }
  }
  return finish(argv.slice(i));

  function finish(rest: readonly string[]): TraceOptions {
    const [script = null, ...args] = rest;
    if (script === null && !help) throw new UsageError("no script to run: end the options with -- script.ts [args...].");
    if (libraries.length === 0 && signatures.length === 0 && !help) {
      throw new UsageError("nothing to trace: give --library LIB (and --match GLOBS), or --signature SIG.");
    }
    return {
      libraries: libraries.map((l) => ({ library: l.library, match: l.match.length ? l.match : ["*"] })),
      callers,
      signatures,
      countOnly,
      json,
      svg,
      help,
      script,
      args,
    };
  }
}

/** `name(type,...):type` as a function name and signature. */
export function parseSignature(text: string): SignatureOption {
  const m = /^\s*([A-Za-z_$][\w$@.]*)\s*\(([^()]*)\)\s*(?::\s*(\w+))?\s*$/.exec(text);
  if (!m) {
    throw new UsageError(`--signature '${text}' is not of the form name(type,...):type, e.g. 'crc32(u64,pointer,u32):u64'.`);
  }
  const parameters = m[2].split(",").map((t) => t.trim()).filter((t) => t !== "") as NativeType[];
  const result = (m[3] ?? "void") as NativeType;
  try {
    checkSignature({ parameters, result }, `--signature '${text}'`);
  } catch (error) {
    if (error instanceof RedefineError) throw new UsageError(error.message);
    throw error;
  }
  return { symbol: m[1], parameters, result };
}

/** True when `name` matches the glob `pattern` (`*` any run of characters, `?` one character). */
export function globMatches(pattern: string, name: string): boolean {
  const source = pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
  return new RegExp(`^${source}$`).test(name);
}
