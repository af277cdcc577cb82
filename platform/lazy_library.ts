/**
 * A library whose symbols are bound a group at a time, each group when one of its symbols is first
 * used: binding costs a runtime per symbol (Deno compiles a fast-call trampoline for each, ~45 µs),
 * and most of what a layer declares serves calls that a process's first patch never makes (module
 * lists, error text, stub libraries). A bound symbol becomes a plain property: later calls read
 * it as if the whole library had been bound at once.
 */
import type { Binding, NativeCall, Runtime } from "./types.ts";

/** Groups of symbols by a name for each, the ones used together in one group. */
export type SymbolGroups = Readonly<Record<string, Readonly<Record<string, Binding>>>>;

/** Every symbol of every group. */
export type GroupedSymbols<G extends SymbolGroups> = {
  readonly [K in { [N in keyof G]: keyof G[N] }[keyof G]]: NativeCall;
};

/**
 * `path` opened through `runtime`, one `runtime.open` for each group the first time a symbol of it
 * is read; its errors (LIBRARY_NOT_FOUND, SYMBOL_NOT_FOUND, FFI_PERMISSION) come from that read.
 */
export function lazyLibrary<G extends SymbolGroups>(runtime: Runtime, path: string, groups: G): GroupedSymbols<G> {
  const library: Record<string, NativeCall> = {};
  for (const symbols of Object.values(groups)) {
    const bind = (): void => {
      const bound = runtime.open(path, symbols);
      for (const name of Object.keys(symbols)) {
        Object.defineProperty(library, name, { value: bound[name], enumerable: true });
      }
    };
    for (const name of Object.keys(symbols)) {
      Object.defineProperty(library, name, {
        get: () => (bind(), library[name]),
        enumerable: true,
        configurable: true,
      });
    }
  }
  return library as GroupedSymbols<G>;
}
