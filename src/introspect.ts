/**
 * What is loaded and where names resolve, read from the loader's own list and the loaded images'
 * tables: modules, their exports and import slots, the symbol at an address, and every definition
 * of a name in the order the default lookup (`RTLD_DEFAULT`) finds them.
 */
import { RedefineError } from "./errors.ts";
import { platform } from "../platform/mod.ts";
import type { LoadedModule, ModuleExport, ModuleImport } from "../platform/types.ts";

export type { LoadedModule, ModuleExport, ModuleImport } from "../platform/types.ts";

/**
 * Where an address lies: the module, the exported symbol that covers it and how far in.
 *
 * @example
 * ```ts
 * import type { SymbolLocation } from "./mod.ts";
 * const where: SymbolLocation = { library: "libc.so.6", path: "/lib/libc.so.6", name: "getpid",
 *   address: 0x7f00_0000_1000n, offset: 3 };
 * ```
 */
export interface SymbolLocation {
  /** The module's name, as `modules()` lists it. */
  readonly library: string;
  /** The module's path. */
  readonly path: string;
  /** The symbol's name. */
  readonly name: string;
  /** The symbol's first byte. */
  readonly address: bigint;
  /** Bytes from the symbol's first byte to the address asked about. */
  readonly offset: number;
}

/**
 * One definition of a name: an export and the module it is in.
 *
 * @example
 * ```ts
 * import { find } from "./mod.ts";
 * const [first] = find("getpid");
 * console.log(`${first.library} defines getpid at 0x${first.address.toString(16)}`);
 * ```
 */
export interface Definition extends ModuleExport {
  /** The module's name, as `modules()` lists it. */
  readonly library: string;
  /** The module's path. */
  readonly path: string;
}

/**
 * Every module loaded in the process, as the dynamic loader lists them: the main executable first
 * (named by its file), then libraries in load order, the vDSO among them (path `[vdso]`).
 *
 * @example
 * ```ts
 * import { modules } from "./mod.ts";
 * for (const m of modules()) console.log(m.name, m.path, `0x${m.base.toString(16)}`, m.size);
 * ```
 */
export function modules(): LoadedModule[] {
  return platform().os.modules();
}

/**
 * The loaded module `library` names: its file name as the loader lists it (`"libc.so.6"`) or its
 * full path. Throws LIBRARY_NOT_FOUND when no loaded module has that name; it never loads one.
 */
export function findModule(library: string): LoadedModule {
  checkName(library, "library");
  const found = matchModule(modules(), library, platform().runtime.os === "windows");
  if (found === undefined) {
    throw new RedefineError(
      "LIBRARY_NOT_FOUND",
      `no loaded module is named '${library}'. Give its file name as modules() lists it ` +
        `(e.g. "libc.so.6") or its full path, and load it first (it is never loaded for you).`,
    );
  }
  return found;
}

/**
 * The module `library` names among `all`: by path first, then by file name; Windows names match
 * whatever their case (`KERNEL32.DLL` is `kernel32.dll`).
 */
export function matchModule(all: readonly LoadedModule[], library: string, foldCase: boolean): LoadedModule | undefined {
  const fold = (text: string) => (foldCase ? text.toLowerCase() : text);
  const wanted = fold(library);
  return all.find((m) => fold(m.path) === wanted) ?? all.find((m) => fold(m.name) === wanted);
}

/**
 * The symbols a loaded library defines for others (functions and data; thread-local variables
 * left out), with their versions: `default: false` marks a compat-only version (`name@V`), which
 * only a reference asking for that version binds. An indirect function (glibc's `memcpy`) is
 * listed at the implementation the loader picked, with size 0.
 *
 * @example
 * ```ts
 * import { exports } from "./mod.ts";
 * const getpid = exports("libc.so.6").find((e) => e.name === "getpid" && e.default);
 * console.log(getpid?.kind, getpid?.size);
 * ```
 */
export function exports(library: string): ModuleExport[] {
  return platform().os.exports(findModule(library));
}

/**
 * The import slots of a loaded library: each symbol it reaches through its GOT (`jump_slot` for
 * calls through the PLT, `glob_dat` for `&symbol`; on Windows its import address table, `iat`),
 * the slot's address and what it holds now. These slots are what a patch with `callers` rewrites.
 *
 * @example
 * ```ts
 * import { imports } from "./mod.ts";
 * for (const i of imports("libm.so.6").slice(0, 3)) console.log(i.name, i.kind, i.target);
 * ```
 */
export function imports(library: string): ModuleImport[] {
  return platform().os.imports(findModule(library));
}

/**
 * The exported symbol covering `address` and the module it is in (of aliases, the public name:
 * `getpid`, not `__getpid`); null when no module or no exported symbol covers it.
 *
 * @example
 * ```ts
 * import { exports, symbolAt } from "./mod.ts";
 * const getpid = exports("libc.so.6").find((e) => e.name === "getpid")!;
 * console.log(symbolAt(getpid.address + 3n)); // { library: "libc.so.6", name: "getpid", offset: 3, ... }
 * ```
 */
export function symbolAt(address: bigint): SymbolLocation | null {
  if (typeof address !== "bigint" || address < 0n || address >= 2n ** 64n) {
    throw new RedefineError(
      "INVALID_ADDRESS",
      `symbolAt wants an address as a bigint in [0, 2^64), not ${String(address)}.`,
    );
  }
  const module = moduleAt(address);
  if (module === null) return null;
  const covering = platform().os.exports(module)
    .filter((e) => address >= e.address && address < e.address + BigInt(Math.max(e.size, 1)));
  if (covering.length === 0) return null;
  // Aliases share an address (glibc: getpid and __getpid): the public name is the one to show.
  const rank = (e: ModuleExport) => [e.default ? 0 : 1, /^_*/.exec(e.name)![0].length, e.name.length];
  const [best] = covering.sort((a, b) => {
    const [x, y] = [rank(a), rank(b)];
    return x[0] - y[0] || x[1] - y[1] || x[2] - y[2] || (a.name < b.name ? -1 : 1);
  });
  return { library: module.name, path: module.path, name: best.name, address: best.address,
    offset: Number(address - best.address) };
}

/** The loaded module whose image holds `address`, or null. */
export function moduleAt(address: bigint): LoadedModule | null {
  return modules().find((m) => address >= m.base && address < m.base + BigInt(m.size)) ?? null;
}

/**
 * Every loaded module that defines `symbol` (its default version), in the loader's order — the
 * order in which the default lookup (`RTLD_DEFAULT`, what `redefine` without `library` uses)
 * searches the global scope: the main executable first, then libraries in load order. The first
 * is what a name without `library` resolves to: under Bun, `memcmp` is Bun's own.
 *
 * @example
 * ```ts
 * import { find } from "./mod.ts";
 * console.log(find("memcmp").map((d) => d.library)); // ["libc.so.6"]; under Bun, Bun's executable first
 * ```
 */
export function find(symbol: string): Definition[] {
  checkName(symbol, "symbol");
  const { os } = platform();
  return modules().flatMap((m) =>
    os.exports(m)
      .filter((e) => e.name === symbol && e.default)
      .map((e) => ({ ...e, library: m.name, path: m.path }))
  );
}

/** Names are C strings: a NUL inside one would silently cut it short. */
export function checkName(name: string, what: "library" | "symbol"): void {
  const code = what === "library" ? "LIBRARY_NOT_FOUND" : "SYMBOL_NOT_FOUND";
  if (typeof name !== "string" || name === "") {
    throw new RedefineError(code, `a ${what} name must be a non-empty string, not ${String(name)}.`);
  }
  const nul = name.indexOf("\0");
  if (nul >= 0) {
    throw new RedefineError(
      code,
      `the ${what} name '${name.slice(0, nul)}\\0${name.slice(nul + 1)}' holds a NUL byte at ${nul}: ` +
        `C names end at the first NUL, so this one cannot name anything. Remove the NUL.`,
    );
  }
}

