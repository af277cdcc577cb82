/**
 * The Node adapter (Node 26 and later): `node:ffi`'s DynamicLibrary, toArrayBuffer and
 * registerCallback. node:ffi has no call through a raw address; a callable for one is a symbol of a
 * one-symbol library built in memory whose symbol is absolute (SHN_ABS, platform/image/elf.ts):
 * `dlsym` returns the address itself, and node:ffi binds it like any symbol, on its fast path.
 */
import { hex, RedefineError } from "../src/errors.ts";
import type { NativeType, Signature } from "../src/signature.ts";
import { buildStubImage } from "./image/elf.ts";
import type { Binding, NativeCall, NativeCallback, Runtime } from "./types.ts";

type FfiSignature = { arguments: string[]; return: string };

/** What this adapter uses of Node's `process`. */
interface NodeProcess {
  getBuiltinModule(id: string): unknown;
  readonly platform: string;
  readonly arch: string;
}

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

// The global, and node:fs by `getBuiltinModule`, not imported: an ESM import of a builtin builds a
// facade of all its exports (node:fs then loads its streams), 3 ms of start-up each.
const process = (globalThis as unknown as { process: NodeProcess }).process;
const { writeFileSync } = process.getBuiltinModule("node:fs") as typeof import("node:fs");
// Node before 26, or run with --no-experimental-ffi, has no node:ffi: platform/mod.ts says so.
// Asked of `process`, not imported: no module graph (Deno's checker, JSR's) tries to resolve it.
const ffi = process.getBuiltinModule("node:ffi") as Ffi | undefined;

const NODE_TYPES: Record<NativeType, string> = {
  i8: "int8", u8: "uint8", i16: "int16", u16: "uint16", i32: "int32", u32: "uint32",
  i64: "int64", u64: "uint64", usize: "uint64", isize: "int64", f32: "float32", f64: "float64",
  // node:ffi's `function` type takes the slow call path; an address is an address.
  bool: "bool", pointer: "pointer", buffer: "pointer", function: "pointer", void: "void",
};

/** A pointer-like parameter, which node:ffi may equally be told is a `function`. */
const POINTER_LIKE = new Set<NativeType>(["pointer", "buffer", "function"]);

function definition(signature: Binding): FfiSignature {
  // A `function` argument keeps the binding off the Fast API path, where JS that runs inside the
  // call and deoptimizes its caller aborts V8: the way off it for a call that may run JS.
  const type = (t: NativeType) => (signature.callback && POINTER_LIKE.has(t) ? "function" : NODE_TYPES[t]);
  return { arguments: signature.parameters.map(type), return: NODE_TYPES[signature.result] };
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

/** The integer types' ranges, for checking what a callback returns. */
const RANGES: Partial<Record<NativeType, readonly [bigint, bigint]>> = {
  i8: [-(2n ** 7n), 2n ** 7n - 1n], u8: [0n, 2n ** 8n - 1n],
  i16: [-(2n ** 15n), 2n ** 15n - 1n], u16: [0n, 2n ** 16n - 1n],
  i32: [-(2n ** 31n), 2n ** 31n - 1n], u32: [0n, 2n ** 32n - 1n],
  i64: [-(2n ** 63n), 2n ** 63n - 1n], isize: [-(2n ** 63n), 2n ** 63n - 1n],
  u64: [0n, 2n ** 64n - 1n], usize: [0n, 2n ** 64n - 1n],
  pointer: [0n, 2n ** 64n - 1n], buffer: [0n, 2n ** 64n - 1n], function: [0n, 2n ** 64n - 1n],
};
const WIDE: ReadonlySet<NativeType> = new Set(["i64", "u64", "usize", "isize", "pointer", "buffer", "function"]);

/**
 * `value`, returned by a replacement, as node:ffi takes a `type`: a value it would not take aborts
 * the process there, so it is refused here with BAD_REPLACEMENT.
 */
function nativeResult(type: NativeType, value: unknown): unknown {
  if (type === "void") return undefined;
  if (type === "bool") return value ? 1 : 0;
  const range = RANGES[type];
  // A bigint for a 64-bit type wraps to 64 bits, as Deno and Bun wrap it.
  const wide = typeof value === "bigint" && WIDE.has(type);
  const bigint = wide ? (range![0] < 0n ? BigInt.asIntN(64, value) : BigInt.asUintN(64, value)) : value;
  const integer = typeof bigint === "bigint" ? bigint : Number.isInteger(bigint) ? BigInt(bigint as number) : null;
  if (range ? integer !== null && integer >= range[0] && integer <= range[1] : typeof value === "number") {
    return WIDE.has(type) ? integer : range ? Number(integer) : value;
  }
  throw new RedefineError(
    "BAD_REPLACEMENT",
    `the replacement returned ${shown(value)}, which ${type} cannot hold: return ` +
      `${WIDE.has(type) ? "a bigint" : "a number"}${range ? ` from ${range[0]} to ${range[1]}` : ""}.`,
  );
}

function shown(value: unknown): string {
  return typeof value === "bigint" ? `${value}n` : typeof value === "string" ? JSON.stringify(value) : String(value);
}

/**
 * What a callback of result `type` hands node:ffi for `value`: a value already of the kind node:ffi
 * takes goes on after a `typeof` and, for 64 bits, a wrap (asked on every call of a callback: the
 * range check of `nativeResult` is a dozen bigint operations); anything else goes through it.
 */
function resultOf(type: NativeType): (value: unknown) => unknown {
  const range = RANGES[type];
  if (type === "void") return () => undefined;
  if (type === "bool") return (value) => (value ? 1 : 0);
  if (WIDE.has(type)) {
    return range![0] < 0n
      ? (value) => (typeof value === "bigint" ? BigInt.asIntN(64, value) : nativeResult(type, value))
      : (value) => (typeof value === "bigint" ? BigInt.asUintN(64, value) : nativeResult(type, value));
  }
  if (range) {
    const low = Number(range[0]), high = Number(range[1]);
    return (value) =>
      typeof value === "number" && value >= low && value <= high && Number.isInteger(value) ? value : nativeResult(type, value);
  }
  return (value) => (typeof value === "number" ? value : nativeResult(type, value));
}

/** `resultOf` each type, made once: every callback of a type shares its function. */
const RESULTS: ReadonlyMap<NativeType, (value: unknown) => unknown> = new Map(
  (Object.keys(NODE_TYPES) as NativeType[]).map((type) => [type, resultOf(type)]),
);

/** A callback's JS function as node:ffi wants it: native values in, a native value out, no throw. */
function callbackBody(signature: Signature, fn: NativeCall): NativeCall {
  const { parameters, result } = signature;
  const zero = result === "void" ? undefined : WIDE.has(result) ? 0n : 0;
  const native = RESULTS.get(result)!;
  // node:ffi aborts the process when a callback throws: the native caller gets 0 instead and the
  // error is thrown again as soon as the current JS turn ends, as an uncaught exception.
  const failed = (error: unknown) => {
    queueMicrotask(() => {
      throw error;
    });
    return zero;
  };
  if (parameters.includes("bool")) {
    return (...args: unknown[]) => {
      try {
        return native(fn(...args.map((a, i) => (parameters[i] === "bool" ? a !== 0 : a))));
      } catch (error) {
        return failed(error);
      }
    };
  }
  // One function per arity up to 3: forwarding a rest array costs a call 3%.
  // deno-lint-ignore no-explicit-any
  type A = any;
  switch (parameters.length) {
    case 0:
      return () => {
        try { return native(fn()); } catch (error) { return failed(error); }
      };
    case 1:
      return (a: A) => {
        try { return native(fn(a)); } catch (error) { return failed(error); }
      };
    case 2:
      return (a: A, b: A) => {
        try { return native(fn(a, b)); } catch (error) { return failed(error); }
      };
    case 3:
      return (a: A, b: A, c: A) => {
        try { return native(fn(a, b, c)); } catch (error) { return failed(error); }
      };
    default:
      return (...args: A[]) => {
        try { return native(fn(...args)); } catch (error) { return failed(error); }
      };
  }
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
const MFD_CLOEXEC = 1;
const MFD_EXEC = 0x10;

function adapter(ffi: Ffi): Runtime {
  // Callbacks belong to a library in node:ffi; this one, the process itself, is never closed. It is
  // made on first use, so that a missing --allow-ffi is an error of the call that needed FFI.
  let owner: FfiLibrary | undefined;
  const callbacks = () => (owner ??= new ffi.DynamicLibrary(process.platform === "win32" ? "kernel32.dll" : null));

  // One DynamicLibrary a path, opened once: making one costs ~50-70 µs, and node:ffi binds a symbol
  // a library has bound before in a few µs (the OS layer and the shared registry both bind libc's
  // mmap, this adapter and the OS layer its memfd_create), a fresh one in 25-100. A library keeps
  // each name's first signature and refuses the name with another ("already requested with a
  // different signature"): a name bound again otherwise (a stub slot of src/original.ts reused for
  // another signature, a symbol declared two ways) gets a fresh library, which the path keeps from
  // then on. The signatures are kept by name here, as their text, to know before asking.
  const opened = new Map<string, { lib: FfiLibrary; signatures: Map<string, string> }>();

  function load(path: string): FfiLibrary {
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

  /** `path`'s library to bind `name` as `text` from: the one it has, unless that has `name` otherwise. */
  function library(path: string, name: string, text: string): { lib: FfiLibrary; signatures: Map<string, string> } {
    const known = opened.get(path);
    const before = known?.signatures.get(name);
    if (known && (before === undefined || before === text)) return known;
    const fresh = { lib: load(path), signatures: new Map<string, string>() };
    opened.set(path, fresh);
    return fresh;
  }

  function open<K extends string>(path: string, symbols: Record<K, Binding>) {
    const bound: Record<string, NativeCall> = {};
    for (const [name, signature] of Object.entries<Binding>(symbols)) {
      const ffiSignature = definition(signature);
      const text = `${ffiSignature.arguments.join()}>${ffiSignature.return}`;
      const { lib, signatures } = library(path, name, text);
      try {
        bound[name] = withBooleans(signature, lib.getFunction(name, ffiSignature));
        signatures.set(name, text);
      } catch (error) {
        if (signature.optional) continue;
        throw new RedefineError("SYMBOL_NOT_FOUND", `binding ${path}: ${(error as Error).message}`, { cause: error });
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

  let memfdCreate: NativeCall | undefined;

  /**
   * A path the loader opens, holding `bytes`: a memfd, /proc/self/fd/N (no file on disk, where a
   * temporary directory may be mounted noexec). The descriptor stays open: the loader knows a
   * library by its path, so a number used again would give back the library loaded before.
   */
  function memoryFile(bytes: Uint8Array): string {
    memfdCreate ??= open("libc.so.6", { memfd_create: { parameters: ["buffer", "u32"], result: "i32" } })
      .memfd_create;
    const label = new TextEncoder().encode("redefine-call\0");
    let fd = memfdCreate(label, MFD_CLOEXEC | MFD_EXEC) as number;
    if (fd < 0) fd = memfdCreate(label, MFD_CLOEXEC) as number; // kernels before 6.3 lack MFD_EXEC
    if (fd < 0) throw new RedefineError("ALLOCATION_FAILED", "memfd_create failed for a call through an address.");
    writeFileSync(fd, bytes);
    return `/proc/self/fd/${fd}`;
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
      try {
        const lib = callbacks();
        const address = lib.registerCallback(definition(signature), callbackBody(signature, fn));
        return { address, close: () => lib.unregisterCallback(address) };
      } catch (error) {
        throw permissionError(error, "a JS replacement") ?? error;
      }
    },

    fnPointer(address, signature) {
      const { bytes, name } = absoluteSymbol(notNull(address, "a native call"));
      // Each its own path, never opened again: not kept.
      return withBooleans(signature, load(memoryFile(bytes)).getFunction(name, definition(signature)));
    },
  };
}

/** The Node adapter, or null where this Node has no `node:ffi`. */
export const node: Runtime | null = ffi ? adapter(ffi) : null;
