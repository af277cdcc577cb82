/**
 * A library whose symbols are bound a group at a time, each group when one of its symbols is first
 * used: binding costs a runtime per symbol (Deno compiles a fast-call trampoline for each, ~50-100
 * µs), and most of what a layer declares serves calls that a process's first patch never makes
 * (module lists, error text, stub libraries). A bound symbol becomes a plain property: later calls
 * read it as if the whole library had been bound at once. Symbols a process calls only a handful
 * of times (`seldom`) are not bound at all where a call through a pointer is cheap to make and
 * slow to call (Deno: ~25 µs to make, ~1 µs a call): each is called through its address instead;
 * those a first patch calls a few times and later patches often are bound once they prove busy.
 */
import type { Binding, NativeCall, Runtime } from "./types.ts";

/** Groups of symbols by a name for each, the ones used together in one group. */
export type SymbolGroups = Readonly<Record<string, Readonly<Record<string, Binding>>>>;

/** The name of every symbol of every group. */
export type SymbolName<G extends SymbolGroups> = { [N in keyof G]: keyof G[N] & string }[keyof G];

/** Every symbol of every group. */
export type GroupedSymbols<G extends SymbolGroups> = { readonly [K in SymbolName<G>]: NativeCall };

/**
 * Which symbols are seldom called, which are called a few times by a first patch and often after,
 * and where each is (in the library, as its loader finds it). `Name`: the groups' symbols, so a
 * name no group declares (misspelt) is a type error, not a symbol silently left bound.
 */
export type SeldomSymbols<Name extends string = string> = {
  readonly names: readonly Name[];
  readonly address: (symbol: Name) => bigint;
} & ({ readonly busyLater?: undefined; readonly defer?: undefined } | {
  /** Called through their address for their first `BOUND_AFTER` calls, then bound, each alone. */
  readonly busyLater: readonly Name[];
  /**
   * Takes the binding of a busy-later symbol that has proven busy, for the caller to run where
   * nothing is half-done: binding runs the dynamic loader and the runtime's compiler on this
   * thread, and the call that proves the symbol busy may be one store of several into a live
   * function's entry, which holds a jump to itself meanwhile — should they call that function,
   * this thread would wait on itself for ever. A binding that fails, however, leaves the call
   * through the address, as good but slower: what it was given never throws.
   */
  readonly defer: (bind: () => void) => void;
});

/**
 * How many calls a `busyLater` symbol takes through its address: a first patch and its restore make
 * a few (a mapping query, a write, a symbol's size); binding it costs a hundred slow calls' worth.
 */
const BOUND_AFTER = 16;

/**
 * `path` opened through `runtime`, one `runtime.open` for each group the first time a symbol of it
 * is read; its errors (LIBRARY_NOT_FOUND, SYMBOL_NOT_FOUND, FFI_PERMISSION) come from that read.
 * Where `runtime.slowPointerCalls`, the `seldom` symbols leave their groups: each is a call through
 * its address, made when it is first read (`seldom.address` throws for a missing one), and a
 * `busyLater` one is bound on its own once it has been called `BOUND_AFTER` times, when the caller
 * runs what it was given to `seldom.defer`.
 */
export function lazyLibrary<G extends SymbolGroups>(
  runtime: Runtime,
  path: string,
  groups: G,
  seldom?: SeldomSymbols<NoInfer<SymbolName<G>>>,
): GroupedSymbols<G> {
  const library: Record<string, NativeCall> = {};
  const settle = (name: string, value: NativeCall) => Object.defineProperty(library, name, { value, enumerable: true });
  const lazily = (name: string, bind: () => void) =>
    Object.defineProperty(library, name, { get: () => (bind(), library[name]), enumerable: true, configurable: true });
  /** `name` through its address. */
  const pointerCall = (name: string, signature: Binding): void => {
    settle(name, runtime.fnPointer(seldom!.address(name), signature));
  };
  /** `name` through its address, until its calls show it busy: then bound. */
  const throughAddress = (name: string, signature: Binding): void => {
    const call = runtime.fnPointer(seldom!.address(name), signature);
    let left = BOUND_AFTER;
    // Never throws, whatever the runtime raises: it runs as a section under the registry's lock
    // ends (Os.runDeferred), where an error would replace the section's outcome (a patch made and
    // never handed back), and the call through the address serves as well.
    const bindAlone = (): void => {
      try {
        settle(name, runtime.open(path, { [name]: signature })[name]!);
      } catch {
        // Left a call through its address.
      }
    };
    const counted: NativeCall = (...args) => {
      if (--left === 0) seldom!.defer!(bindAlone);
      return call(...args);
    };
    Object.defineProperty(library, name, { value: counted, enumerable: true, configurable: true });
  };
  /** How each symbol kept out of its group is made: the seldom ones, where pointer calls are slow. */
  const apart = new Map<string, (name: string, signature: Binding) => void>();
  if (runtime.slowPointerCalls && seldom) {
    for (const name of seldom.busyLater ?? []) apart.set(name, throughAddress);
    for (const name of seldom.names) apart.set(name, pointerCall);
  }
  for (const all of Object.values(groups)) {
    const symbols = apart.size === 0 ? all : Object.fromEntries(Object.entries(all).filter(([name]) => !apart.has(name)));
    const bind = (): void => {
      const bound = runtime.open(path, symbols);
      for (const name of Object.keys(symbols)) settle(name, bound[name] as NativeCall);
    };
    for (const [name, signature] of Object.entries(all)) {
      const make = apart.get(name);
      lazily(name, make ? () => make(name, signature) : bind);
    }
  }
  return library as GroupedSymbols<G>;
}
