/**
 * What Linux and macOS share, over the libc functions their layers bind: C strings, errno as text,
 * and symbols through dlfcn (`dlopen`, `dlsym`, `dlerror`). Each system keeps its own spelling:
 * where errno lives, `RTLD_DEFAULT`, the errno numbers they assign differently, the advice in
 * messages.
 */
import { RedefineError } from "../src/errors.ts";
import type { NativeCall, Runtime } from "./types.ts";

const RTLD_LAZY = 1;

/** The errno numbers Linux and macOS agree on. */
const ERRNO_NAMES: Readonly<Record<number, string>> = {
  1: "EPERM", 5: "EIO", 9: "EBADF", 12: "ENOMEM", 13: "EACCES", 14: "EFAULT", 17: "EEXIST", 22: "EINVAL",
};

/** The libc functions the helpers call, as the OS layer bound them. */
export interface PosixLibc {
  readonly strerror: NativeCall;
  readonly dlopen: NativeCall;
  readonly dlerror: NativeCall;
  readonly dlsym: NativeCall;
}

/** How one system differs. */
export interface PosixFlavour {
  /** The calling thread's errno (`__errno_location()` on Linux, `__error()` on macOS). */
  readonly errnoAddress: () => bigint;
  /** errno names beyond the shared ones, numbered the system's way. */
  readonly errnoNames: Readonly<Record<number, string>>;
  /** `dlsym`'s handle for "anywhere in the process". */
  readonly rtldDefault: bigint;
  /** The sentence that ends LIBRARY_NOT_FOUND: which names the loader takes. */
  readonly libraryAdvice: string;
  /** How a symbol is spelled, for SYMBOL_NOT_FOUND (in parentheses after "Check the spelling"). */
  readonly spelling: string;
}

/** The helpers, bound to one libc. */
export interface Posix {
  /** The calling thread's errno, read right after the failed call. */
  errno(): number;
  /** `EACCES (Permission denied)` style, for messages. */
  errnoText(code?: number): string;
  /** A `dlopen` handle for `library`; throws LIBRARY_NOT_FOUND with `dlerror`'s reason. */
  dlHandle(library: string): bigint;
  /** `Os.symbolAddress` through `dlsym`. */
  symbolAddress(symbol: string, library?: string): bigint;
}

const encoder = new TextEncoder();

/** A NUL-terminated C string. */
export function cString(text: string): Uint8Array {
  return encoder.encode(text + "\0");
}

/** The shared helpers over `c`, spoken in `flavour`. */
export function posix(runtime: Runtime, c: PosixLibc, flavour: PosixFlavour): Posix {
  // A library stays loaded once we hold a handle to it (nothing here calls dlclose), so one
  // `dlopen` per library name serves every later lookup, and a symbol found in it stays where it
  // is. Lookups anywhere in the process are asked each time: a library loaded since may come first.
  const handles = new Map<string, bigint>();
  const inLibrary = new Map<string, bigint>();
  // Symbol names are written into one reused buffer: a lookup allocates nothing.
  let name = new Uint8Array(256);
  function nameOf(symbol: string): Uint8Array {
    // An ASCII name (nearly every C name) copied by hand: `encodeInto` is a call into the runtime
    // (Deno ~0.2 µs a lookup, Bun and Node ~0.1), a loop over a short name a few ns a character.
    const length = symbol.length;
    if (length < name.length) {
      let i = 0;
      for (; i < length; i++) {
        const c = symbol.charCodeAt(i);
        if (c >= 0x80) break;
        name[i] = c;
      }
      if (i === length) {
        name[length] = 0;
        return name;
      }
    }
    for (;;) {
      const { read, written } = encoder.encodeInto(symbol, name.subarray(0, name.length - 1));
      if (read === symbol.length) {
        name[written] = 0;
        return name;
      }
      name = new Uint8Array(name.length * 2);
    }
  }

  function errno(): number {
    return new DataView(runtime.view(flavour.errnoAddress(), 4).slice().buffer).getInt32(0, true);
  }

  function errnoText(code = errno()): string {
    const name = flavour.errnoNames[code] ?? ERRNO_NAMES[code] ?? "errno " + code;
    return `${name} (${runtime.cString(c.strerror(code) as bigint)})`;
  }

  function dlHandle(library: string): bigint {
    const known = handles.get(library);
    if (known !== undefined) return known;
    // Taken before the call: binding or finding it after would run the loader, which clears the
    // error it reports.
    const dlerror = c.dlerror;
    const handle = c.dlopen(cString(library), RTLD_LAZY) as bigint;
    if (handle === 0n) {
      const why = dlerror() as bigint;
      throw new RedefineError(
        "LIBRARY_NOT_FOUND",
        `cannot open library '${library}'${why ? ": " + runtime.cString(why) : ""}. ${flavour.libraryAdvice}`,
      );
    }
    handles.set(library, handle);
    return handle;
  }

  function symbolAddress(symbol: string, library?: string): bigint {
    const key = library === undefined ? undefined : `${library}\0${symbol}`;
    const known = key === undefined ? undefined : inLibrary.get(key);
    if (known !== undefined) return known;
    const handle = library === undefined ? flavour.rtldDefault : dlHandle(library);
    const address = c.dlsym(handle, nameOf(symbol)) as bigint;
    if (address === 0n) {
      throw new RedefineError(
        "SYMBOL_NOT_FOUND",
        `no symbol '${symbol}' in ${library === undefined ? "the process" : `'${library}'`}. Check ` +
          `the spelling (${flavour.spelling}) and that the library exporting it is loaded` +
          (library === undefined ? ", or name it with { library }." : "."),
      );
    }
    if (key !== undefined) inLibrary.set(key, address);
    return address;
  }

  return { errno, errnoText, dlHandle, symbolAddress };
}
