/**
 * The Bun runtime adapter: `bun:ffi`'s dlopen, toArrayBuffer, JSCallback and CFunction. Bun's
 * pointers are JS numbers; they become `bigint` addresses at this boundary and nowhere else.
 */
import { RedefineError } from "../src/errors.ts";
import type { NativeType, Signature } from "../src/signature.ts";
import type { Binding, NativeCall, NativeCallback, Runtime } from "./types.ts";

/** What this adapter uses of bun:ffi, declared here: neither Deno's checker nor @types/node knows bun:ffi. */
interface BunFfi {
  dlopen(path: string, symbols: Record<string, unknown>): { symbols: Record<string, NativeCall> };
  toArrayBuffer(pointer: number, offset: number, length: number): ArrayBuffer;
  CString: new (pointer: number) => { toString(): string };
  JSCallback: new (fn: NativeCall, definition: unknown) => { ptr: number | null; close(): void };
  CFunction(definition: { ptr: number }): unknown;
}

// Asked of `process`, not imported: a static `bun:ffi` import breaks Deno at load time, and a
// dynamic one is unanalyzable to JSR. platform/mod.ts only loads this file on Bun. The global
// `process`, not node:process: the one JavaScript bundle of dist/ holds this file too, and there
// Deno and Node would load node:process for it (Node: 3 ms of start-up).
const process = (globalThis as unknown as { process: { getBuiltinModule(id: string): unknown; platform: string; arch: string } })
  .process;
const ffi = process.getBuiltinModule("bun:ffi") as BunFfi;

/** Pointers travel as `usize` (a bigint address); buffers stay buffers (a TypedArray goes in). */
function bunType(type: NativeType): string {
  switch (type) {
    case "pointer":
    case "function":
      return "usize";
    case "isize":
      return "i64";
    default:
      return type;
  }
}

function bunDefinition(signature: Signature) {
  // deno-lint-ignore no-explicit-any
  return { args: signature.parameters.map(bunType), returns: bunType(signature.result) } as any;
}

function openOne(path: string, definitions: Record<string, unknown>) {
  try {
    return ffi.dlopen(path, definitions).symbols;
  } catch (error) {
    return error as Error;
  }
}

/** The Bun adapter. */
export const bun: Runtime = {
  name: "bun",
  os: process.platform === "win32" ? "windows" : process.platform,
  arch: process.arch,

  open<K extends string>(path: string, symbols: Record<K, Binding>) {
    const entries = Object.entries<Binding>(symbols);
    // Bun has no optional symbols: bind the required ones together and each optional one alone.
    const required = Object.fromEntries(
      entries.filter(([, s]) => !s.optional).map(([n, s]) => [n, bunDefinition(s)]),
    );
    // Bun refuses a library with no symbols to bind: with only optional ones, bind none together.
    const bound = Object.keys(required).length ? openOne(path, required) : {};
    if (bound instanceof Error) {
      const missingLibrary = /cannot open|no such file|not found|failed to open library/i.test(bound.message) &&
        !/symbol/i.test(bound.message);
      throw new RedefineError(
        missingLibrary ? "LIBRARY_NOT_FOUND" : "SYMBOL_NOT_FOUND",
        missingLibrary
          ? `cannot open library '${path}': ${bound.message}. Give a name the dynamic loader finds ` +
            `(e.g. "libc.so.6") or an absolute path.`
          : `binding ${path}: ${bound.message}`,
        { cause: bound },
      );
    }
    const result: Record<string, NativeCall> = { ...bound };
    for (const [name, s] of entries.filter(([, s]) => s.optional)) {
      const one = openOne(path, { [name]: bunDefinition(s) });
      if (!(one instanceof Error)) result[name] = one[name]!;
    }
    return result as Record<K, NativeCall>;
  },

  view(address, length) {
    // Bun refuses an empty view; Deno gives one.
    if (length === 0) return new Uint8Array(0);
    return new Uint8Array(ffi.toArrayBuffer(Number(address), 0, length));
  },

  cString(address) {
    return new ffi.CString(Number(address)).toString();
  },

  callback(signature, fn): NativeCallback {
    const callback = new ffi.JSCallback(fn, bunDefinition(signature));
    return { address: BigInt(callback.ptr as number), close: () => callback.close() };
  },

  fnPointer(address, signature) {
    return ffi.CFunction({ ptr: Number(address), ...bunDefinition(signature) }) as unknown as NativeCall;
  },
};
