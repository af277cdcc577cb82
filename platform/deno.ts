/**
 * The Deno runtime adapter: `Deno.dlopen`, `Deno.UnsafePointerView`, `Deno.UnsafeCallback`.
 * Pointers cross this boundary as `bigint` addresses; Deno's pointer objects never leave this file.
 */
import { RedefineError } from "../src/errors.ts";
import type { NativeType, Signature } from "../src/signature.ts";
import type { DenoDefinition, DenoFfi, DenoParameterType, DenoPointer, DenoResultType } from "./deno_types.ts";
import type { Binding, NativeCall, NativeCallback, Runtime } from "./types.ts";

// Through the adapter's own declaration of it: a Bun or Node project's type check has no Deno namespace.
const Deno = (globalThis as unknown as { Deno: DenoFfi }).Deno;

/** Pointers travel as `usize` (a bigint address); buffers stay buffers (a TypedArray goes in). */
function denoType(type: NativeType): DenoResultType {
  return type === "pointer" || type === "function" ? "usize" : type;
}

function denoDefinition(signature: Signature): DenoDefinition {
  return {
    parameters: signature.parameters.map(denoType) as DenoParameterType[],
    result: denoType(signature.result),
  };
}

/** Deno raises NotCapable (PermissionDenied before 2.0) when --allow-ffi is missing or scoped. */
function ffiGuard<T>(what: string, body: () => T): T {
  try {
    return body();
  } catch (error) {
    const name = (error as Error)?.name;
    if (name === "NotCapable" || name === "PermissionDenied") {
      throw new RedefineError(
        "FFI_PERMISSION",
        `${what} needs FFI access: run Deno with --allow-ffi (unscoped; a path-scoped --allow-ffi=... ` +
          `cannot create callbacks or raw pointers).`,
        { cause: error },
      );
    }
    throw error;
  }
}

function pointer(address: bigint): DenoPointer {
  const p = Deno.UnsafePointer.create(address);
  if (p === null) throw new RedefineError("INVALID_ADDRESS", "the NULL address cannot be used here.");
  return p;
}

/** The Deno adapter. */
export const deno: Runtime = {
  name: "deno",
  os: Deno.build.os,
  arch: Deno.build.arch,

  open<K extends string>(path: string, symbols: Record<K, Binding>) {
    const definitions = Object.fromEntries(
      Object.entries<Binding>(symbols).map((
        [name, s],
      ) => [name, {
        ...denoDefinition(s),
        optional: s.optional ?? false,
        // A function taking a function pointer may call back into JS, which V8's fast calls forbid:
        // older Deno releases keep a `callback` symbol off the fast path; 2.9 ignores the field
        // (README: caveats), so this only helps a user on an older Deno.
        callback: s.parameters.includes("function"),
      }]),
    );
    const library = ffiGuard(`opening ${path}`, () => {
      try {
        return Deno.dlopen(path, definitions);
      } catch (error) {
        if ((error as Error)?.name === "NotCapable" || (error as Error)?.name === "PermissionDenied") {
          throw error;
        }
        throw new RedefineError(
          "LIBRARY_NOT_FOUND",
          `cannot open library '${path}': ${(error as Error).message}. Give a name the dynamic loader ` +
            `finds (e.g. "libc.so.6") or an absolute path.`,
          { cause: error },
        );
      }
    });
    return library.symbols as unknown as Record<K, NativeCall>;
  },

  view(address, length) {
    return ffiGuard(
      "reading native memory",
      () => new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(pointer(address), length)),
    );
  },

  cString(address) {
    return Deno.UnsafePointerView.getCString(pointer(address));
  },

  callback(signature, fn): NativeCallback {
    const callback = ffiGuard(
      "a JS replacement",
      () =>
        new Deno.UnsafeCallback(
          denoDefinition(signature),
          fn as ConstructorParameters<DenoFfi["UnsafeCallback"]>[1],
        ),
    );
    return {
      address: BigInt(Deno.UnsafePointer.value(callback.pointer)),
      close: () => callback.close(),
    };
  },

  slowPointerCalls: true,

  fnPointer(address, signature) {
    const fn = ffiGuard(
      "calling a native address",
      () => new Deno.UnsafeFnPointer(pointer(address) as never, denoDefinition(signature)),
    );
    return fn.call.bind(fn) as NativeCall;
  },
};
