/**
 * A fake FFI for testing OS layers that cannot run here (macOS) or that the tests want to watch
 * (Windows): a `Runtime` whose `open()` binds recorded fake functions and whose `view()` reads and
 * writes a fake memory. Every foreign call is recorded in order with its library, name and
 * arguments (buffers as copies, as they were when the call was made), so a test can assert exact
 * protections, flush ranges and call order.
 */
import type { NativeCall, NativeCallback, Runtime } from "../platform/types.ts";
import type { NativeType, Signature } from "../src/signature.ts";
import { RedefineError } from "../src/errors.ts";

/** One foreign call, as made. */
export interface FakeCall {
  readonly library: string;
  readonly name: string;
  /** Arguments as passed; `buffer` arguments copied at the time of the call. */
  readonly args: readonly unknown[];
}

/** Sparse native memory: regions of bytes at fake addresses. */
export class FakeMemory {
  readonly #regions: { start: bigint; bytes: Uint8Array }[] = [];

  /** Backs `[start, start + bytes.length)` (or `size` zero bytes) with memory; returns its bytes. */
  map(start: bigint, contents: Uint8Array | number): Uint8Array {
    const bytes = typeof contents === "number" ? new Uint8Array(contents) : contents;
    this.#regions.push({ start, bytes });
    return bytes;
  }

  /** Forgets the region starting at `start`. */
  unmap(start: bigint): void {
    const i = this.#regions.findIndex((r) => r.start === start);
    if (i >= 0) this.#regions.splice(i, 1);
  }

  /** The live bytes `[address, address + length)`; throws (a fake segfault) when unmapped. */
  view(address: bigint, length: number): Uint8Array {
    for (const { start, bytes } of this.#regions) {
      if (address >= start && address + BigInt(length) <= start + BigInt(bytes.length)) {
        return bytes.subarray(Number(address - start), Number(address - start) + length);
      }
    }
    throw new Error(`fake segfault: ${length} bytes at 0x${address.toString(16)} are not fake-mapped`);
  }

  /** Copies `bytes` to `address`. */
  write(address: bigint, bytes: ArrayLike<number>): void {
    this.view(address, bytes.length).set(bytes);
  }

  /** Writes `text` as a NUL-terminated string at `address`. */
  writeCString(address: bigint, text: string): void {
    this.write(address, new TextEncoder().encode(text + "\0"));
  }
}

// deno-lint-ignore no-explicit-any
export type FakeFunction = (...args: any[]) => unknown;

/** What a fake runtime is made of. */
export interface FakeRuntimeOptions {
  readonly os: string;
  readonly arch: string;
  readonly name?: "deno" | "bun";
  /** Fake native functions by name, whatever library they are bound from. */
  readonly functions: Record<string, FakeFunction>;
  readonly memory?: FakeMemory;
  /** Libraries `open()` refuses (LIBRARY_NOT_FOUND), as the runtimes do. */
  readonly missingLibraries?: readonly string[];
}

/** A `Runtime` over fakes, with the log of what was called. */
export interface FakeRuntime extends Runtime {
  readonly memory: FakeMemory;
  /** Every foreign call, in order. */
  readonly calls: FakeCall[];
  /** Every `open()`: the path and the symbol names bound. */
  readonly opened: { path: string; symbols: string[] }[];
  /** The argument lists of every call to `name`, in order. */
  callsTo(name: string): (readonly unknown[])[];
  /** The names of the calls made, in order (optionally only those in `names`). */
  names(only?: readonly string[]): string[];
  /** Forgets the calls made so far. */
  clear(): void;
}

const INTEGER_RANGES: Partial<Record<NativeType, [bigint, bigint]>> = {
  i8: [-(2n ** 7n), 2n ** 7n - 1n],
  u8: [0n, 2n ** 8n - 1n],
  i16: [-(2n ** 15n), 2n ** 15n - 1n],
  u16: [0n, 2n ** 16n - 1n],
  i32: [-(2n ** 31n), 2n ** 31n - 1n],
  u32: [0n, 2n ** 32n - 1n],
  i64: [-(2n ** 63n), 2n ** 63n - 1n],
  isize: [-(2n ** 63n), 2n ** 63n - 1n],
  u64: [0n, 2n ** 64n - 1n],
  usize: [0n, 2n ** 64n - 1n],
  pointer: [0n, 2n ** 64n - 1n],
  function: [0n, 2n ** 64n - 1n],
};

const SMALL = new Set<NativeType>(["i8", "u8", "i16", "u16", "i32", "u32"]);

/**
 * Checks an argument as the stricter of the two runtimes would: integers in range (numbers for
 * types up to 32 bits, numbers or bigints above), buffers as typed arrays.
 */
function checkArgument(name: string, index: number, type: NativeType, value: unknown): void {
  const where = `fake ${name}: argument ${index} (${type})`;
  if (type === "buffer") {
    if (value !== null && !ArrayBuffer.isView(value)) throw new TypeError(`${where} is not a buffer: ${value}`);
    return;
  }
  if (type === "f32" || type === "f64") {
    if (typeof value !== "number") throw new TypeError(`${where} is not a number: ${value}`);
    return;
  }
  if (type === "bool") {
    if (typeof value !== "boolean" && typeof value !== "number") throw new TypeError(`${where}: ${value}`);
    return;
  }
  const range = INTEGER_RANGES[type];
  if (!range) throw new TypeError(`${where}: unknown type`);
  if (SMALL.has(type) ? typeof value !== "number" : typeof value !== "number" && typeof value !== "bigint") {
    throw new TypeError(`${where} has the wrong JS type: ${typeof value}`);
  }
  if (typeof value === "number" && !Number.isInteger(value)) throw new TypeError(`${where} is not an integer: ${value}`);
  const v = BigInt(value as number | bigint);
  if (v < range[0] || v > range[1]) throw new TypeError(`${where} is out of range: ${v}`);
}

/** The result as the runtimes hand it over: 64-bit integers as bigint, smaller ones as numbers. */
function convertResult(type: NativeType, value: unknown): unknown {
  if (type === "void") return undefined;
  if (SMALL.has(type)) return Number(value ?? 0);
  if (INTEGER_RANGES[type]) {
    const v = BigInt((value ?? 0) as number | bigint);
    return type === "i64" || type === "isize" ? BigInt.asIntN(64, v) : BigInt.asUintN(64, v);
  }
  return value;
}

/** A fake runtime: calls go to `options.functions`, memory is `options.memory`. */
export function fakeRuntime(options: FakeRuntimeOptions): FakeRuntime {
  const memory = options.memory ?? new FakeMemory();
  const calls: FakeCall[] = [];
  const opened: { path: string; symbols: string[] }[] = [];
  const bind = (library: string, name: string, signature: Signature): NativeCall => {
    const fn = options.functions[name];
    return (...args: unknown[]) => {
      if (args.length !== signature.parameters.length) {
        throw new TypeError(`fake ${name}: ${args.length} arguments for ${signature.parameters.length} parameters`);
      }
      signature.parameters.forEach((type, i) => checkArgument(name, i, type, args[i]));
      calls.push({
        library,
        name,
        args: args.map((a) => (ArrayBuffer.isView(a) ? new Uint8Array(a.buffer, a.byteOffset, a.byteLength).slice() : a)),
      });
      return convertResult(signature.result, fn(...args));
    };
  };
  const runtime: FakeRuntime = {
    name: options.name ?? "deno",
    os: options.os,
    arch: options.arch,
    memory,
    calls,
    opened,
    open<K extends string>(path: string, symbols: Record<K, Signature & { optional?: boolean }>) {
      if (options.missingLibraries?.includes(path)) {
        throw new RedefineError("LIBRARY_NOT_FOUND", `cannot open library '${path}' (fake)`);
      }
      opened.push({ path, symbols: Object.keys(symbols) });
      const bound: Record<string, NativeCall> = {};
      for (const [name, signature] of Object.entries<Signature & { optional?: boolean }>(symbols)) {
        if (options.functions[name]) bound[name] = bind(path, name, signature);
        else if (!signature.optional) {
          throw new RedefineError("SYMBOL_NOT_FOUND", `fake library '${path}' has no '${name}'`);
        }
      }
      return bound as Record<K, NativeCall>;
    },
    view: (address, length) => memory.view(address, length),
    cString(address) {
      const bytes: number[] = [];
      for (let a = address; ; a++) {
        const b = memory.view(a, 1)[0];
        if (b === 0) return new TextDecoder().decode(Uint8Array.from(bytes));
        bytes.push(b);
      }
    },
    callback(): NativeCallback {
      throw new Error("fake runtime: callbacks are not faked");
    },
    fnPointer() {
      throw new Error("fake runtime: function pointers are not faked");
    },
    callsTo: (name) => calls.filter((c) => c.name === name).map((c) => c.args),
    names: (only) => calls.map((c) => c.name).filter((n) => !only || only.includes(n)),
    clear: () => void calls.splice(0),
  };
  return runtime;
}

/** Little-endian field access on an out-parameter buffer a fake function receives. */
export function fields(buffer: ArrayBufferView): DataView {
  return new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
}

/**
 * A fake `GetSystemInfo`: 4 KiB pages, 64 KiB allocation granularity, application addresses from
 * 64 KiB to just under 128 TiB, as on Windows x64.
 */
export function windowsSystemInfo(info: Uint8Array): void {
  const f = fields(info);
  f.setUint32(4, 4096, true); // dwPageSize
  f.setBigUint64(8, 0x10000n, true); // lpMinimumApplicationAddress
  f.setBigUint64(16, 0x7fff_fffe_ffffn, true); // lpMaximumApplicationAddress
  f.setUint32(40, 0x10000, true); // dwAllocationGranularity
}
