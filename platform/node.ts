/**
 * The Node adapter (Node 26 and later): `node:ffi`'s DynamicLibrary, toArrayBuffer and
 * registerCallback. node:ffi has no call through a raw address; a callable for one is a symbol of a
 * one-symbol library built in memory whose symbol is absolute (SHN_ABS, platform/image/elf.ts):
 * `dlsym` returns the address itself, and node:ffi binds it like any symbol, on its fast path.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { hex, RedefineError } from "../src/errors.ts";
import type { NativeType, Signature } from "../src/signature.ts";
import { buildStubImage } from "./image/elf.ts";
import type { NativeCall, NativeCallback, Runtime } from "./types.ts";

type FfiSignature = { arguments: string[]; return: string };

/** What this adapter uses of node:ffi, declared here: Deno's type checker knows no node:ffi. */
interface Ffi {
  DynamicLibrary: new (path: string | null) => FfiLibrary;
  toArrayBuffer(address: bigint, length: number, copy: boolean): ArrayBuffer;
  toString(address: bigint): string | null;
}

interface FfiLibrary {
  getFunction(name: string, signature: FfiSignature): NativeCall;
  registerCallback(signature: FfiSignature, fn: NativeCall): bigint;
  unregisterCallback(address: bigint): void;
}

// Node before 26, or run with --no-experimental-ffi, has no node:ffi: platform/mod.ts says so.
// Asked of `process`, not imported: no module graph (Deno's checker, JSR's) tries to resolve it.
const ffi = (process as unknown as { getBuiltinModule(id: string): unknown }).getBuiltinModule("node:ffi") as
  | Ffi
  | undefined;

const NODE_TYPES: Record<NativeType, string> = {
  i8: "int8", u8: "uint8", i16: "int16", u16: "uint16", i32: "int32", u32: "uint32",
  i64: "int64", u64: "uint64", usize: "uint64", isize: "int64", f32: "float32", f64: "float64",
  // node:ffi's `function` type takes the slow call path; an address is an address.
  bool: "bool", pointer: "pointer", buffer: "pointer", function: "pointer", void: "void",
};

function definition(signature: Signature): FfiSignature {
  return { arguments: signature.parameters.map((t) => NODE_TYPES[t]), return: NODE_TYPES[signature.result] };
}

/** node:ffi's `bool` is a number both ways; Deno's and Bun's is a boolean. */
function withBooleans(signature: Signature, call: NativeCall): NativeCall {
  const bools = signature.parameters.flatMap((t, i) => (t === "bool" ? [i] : []));
  if (bools.length === 0 && signature.result !== "bool") return call;
  return (...args: unknown[]) => {
    for (const i of bools) args[i] = args[i] ? 1 : 0;
    const result = call(...args);
    return signature.result === "bool" ? result !== 0 : result;
  };
}

const WIDE: ReadonlySet<NativeType> = new Set(["i64", "u64", "usize", "isize", "pointer", "buffer", "function"]);

/** What a callback returns to its native caller when the JS function threw. */
function zeroOf(type: NativeType): unknown {
  return type === "void" ? undefined : WIDE.has(type) ? 0n : 0;
}

/** A callback's JS function as node:ffi wants it: native values in, a native value out, no throw. */
function callbackBody(signature: Signature, fn: NativeCall): NativeCall {
  const { parameters, result } = signature;
  const booleans = parameters.includes("bool");
  return (...args: unknown[]) => {
    try {
      const value = fn(...(booleans ? args.map((a, i) => (parameters[i] === "bool" ? a !== 0 : a)) : args));
      if (result === "bool") return value ? 1 : 0;
      return WIDE.has(result) && typeof value === "number" ? BigInt(value) : value;
    } catch (error) {
      // node:ffi aborts the process when a callback throws: the native caller gets 0 instead and
      // the error is thrown again as soon as the current JS turn ends, as an uncaught exception.
      queueMicrotask(() => {
        throw error;
      });
      return zeroOf(result);
    }
  };
}

function notNull(address: bigint, what: string): bigint {
  if (address === 0n) throw new RedefineError("INVALID_ADDRESS", `the NULL address cannot be used for ${what}.`);
  return address;
}

/** Node raises ERR_ACCESS_DENIED under the permission model (`--permission`) without --allow-ffi. */
function permissionError(error: unknown, what: string): RedefineError | null {
  if ((error as { code?: string })?.code !== "ERR_ACCESS_DENIED") return null;
  return new RedefineError(
    "FFI_PERMISSION",
    `${what} needs FFI access: run Node with --allow-ffi (the permission model is on).`,
    { cause: error },
  );
}

const MACHINES: Record<string, "x86_64" | "aarch64"> = { x64: "x86_64", arm64: "aarch64" };

function adapter(ffi: Ffi): Runtime {
  // Callbacks belong to a library in node:ffi; this one, the process itself, is never closed.
  let owner: FfiLibrary | undefined;
  const callbacks = () => (owner ??= new ffi.DynamicLibrary(process.platform === "win32" ? "kernel32.dll" : null));

  function library(path: string): FfiLibrary {
    try {
      return new ffi.DynamicLibrary(path);
    } catch (error) {
      throw permissionError(error, `opening ${path}`) ?? new RedefineError(
        "LIBRARY_NOT_FOUND",
        `cannot open library '${path}': ${(error as Error).message}. Give a name the dynamic loader ` +
          `finds (e.g. "libc.so.6") or an absolute path.`,
        { cause: error },
      );
    }
  }

  function open<K extends string>(path: string, symbols: Record<K, Signature & { optional?: boolean }>) {
    const lib = library(path);
    const bound: Record<string, NativeCall> = {};
    for (const [name, signature] of Object.entries<Signature & { optional?: boolean }>(symbols)) {
      try {
        bound[name] = withBooleans(signature, lib.getFunction(name, definition(signature)));
      } catch (error) {
        if (signature.optional) continue;
        throw permissionError(error, `binding ${name}`) ??
          new RedefineError("SYMBOL_NOT_FOUND", `binding ${path}: ${(error as Error).message}`, { cause: error });
      }
    }
    return bound as Record<K, NativeCall>;
  }

  /** The image of a library whose one symbol is `address` itself. */
  function absoluteSymbol(address: bigint): { bytes: Uint8Array; name: string } {
    const machine = MACHINES[process.arch];
    if (process.platform !== "linux" || machine === undefined) {
      throw new RedefineError(
        "UNSUPPORTED_PLATFORM",
        `calling the native address ${hex(address)} from Node needs an in-memory ELF library: Linux ` +
          `x86-64 and arm64 only (node:ffi has no call through a raw pointer).`,
      );
    }
    const image = buildStubImage({
      machine,
      count: 1,
      prefix: `redefine_call_${address.toString(16)}_`,
      stubSize: 0,
      jump: () => new Uint8Array(0),
      targets: [address],
    });
    return { bytes: image.bytes, name: image.name(0) };
  }

  return {
    name: "node",
    os: process.platform === "win32" ? "windows" : process.platform,
    arch: process.arch,

    open,

    view(address, length) {
      if (length === 0) return new Uint8Array(0);
      return new Uint8Array(ffi.toArrayBuffer(notNull(address, "a view of memory"), length, false));
    },

    cString(address) {
      return ffi.toString(notNull(address, "a C string")) ?? "";
    },

    callback(signature, fn): NativeCallback {
      const lib = callbacks();
      let address: bigint;
      try {
        address = lib.registerCallback(definition(signature), callbackBody(signature, fn));
      } catch (error) {
        throw permissionError(error, "a JS replacement") ?? error;
      }
      return { address, close: () => lib.unregisterCallback(address) };
    },

    fnPointer(address, signature) {
      const { bytes, name } = absoluteSymbol(notNull(address, "a native call"));
      // The loader keeps the mapping; the file can go as soon as it is open.
      const directory = mkdtempSync(join(tmpdir(), "redefine-"));
      try {
        writeFileSync(join(directory, "call.so"), bytes);
        return open(join(directory, "call.so"), { [name]: signature })[name];
      } finally {
        rmSync(directory, { recursive: true, force: true });
      }
    },
  };
}

/** The Node adapter, or null where this Node has no `node:ffi`. */
export const node: Runtime | null = ffi ? adapter(ffi) : null;
