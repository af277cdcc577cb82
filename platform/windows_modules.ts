/**
 * What the Windows layer knows of loaded modules: their list (`K32EnumProcessModules`), names and
 * paths, symbols by name (`GetProcAddress`, following import thunks into the module that holds the
 * code) and by address (`.pdata` through `RtlLookupFunctionEntry`, names from the export directory),
 * and each image's exports and import address table (platform/image/pe_loaded.ts), every read
 * checked with `VirtualQuery` first.
 */
import { hex, RedefineError } from "../src/errors.ts";
import { protectionText } from "./address_space.ts";
import { peExports, peImageSize, peImports } from "./image/pe_loaded.ts";
import type { Reader } from "./image/elf_loaded.ts";
import type { LoadedModule, Mapping, ModuleExport, Os, Runtime, SymbolInfo } from "./types.ts";
import { PROT_READ } from "./types.ts";
import {
  ansiString,
  CURRENT_PROCESS,
  GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS,
  GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT,
  type Kernel32,
  lastErrorText,
  MAX_THUNKS,
  type Ntdll,
  wideString,
} from "./windows_api.ts";

/** The module services of the Windows `Os`, over the memory map `mappingAt` reads. */
export type WindowsModules = Pick<Os, "symbolAddress" | "symbolAt" | "modules" | "exports" | "imports"> & {
  /** The file a module was loaded from. */
  moduleFileName(module: bigint): string;
};

/** The module services for the Windows layer (`k`, `nt`: the bound kernel32 and ntdll). */
export function windowsModules(
  runtime: Runtime,
  k: Kernel32,
  nt: Ntdll,
  pageSize: number,
  mappingAt: (address: bigint) => Mapping | null,
): WindowsModules {
  const exportNames = new Map<bigint, Map<bigint, string>>();
  const read = (address: bigint, length: number) => runtime.view(address, length).slice();
  const u32 = (bytes: Uint8Array, at = 0) => new DataView(bytes.buffer, bytes.byteOffset).getUint32(at, true);
  const u64 = (bytes: Uint8Array, at = 0) => new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(at, true);
  const lastError = () => lastErrorText(k);

  function moduleFileName(module: bigint): string {
    const buffer = new Uint16Array(1024);
    const n = k.GetModuleFileNameW(module, new Uint8Array(buffer.buffer), buffer.length) as number;
    return String.fromCharCode(...buffer.subarray(0, n));
  }

  /** The module (its base) holding `address`, or 0n. */
  function moduleOf(address: bigint): bigint {
    const out = new BigUint64Array(1);
    const flags = GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS | GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT;
    if ((k.GetModuleHandleExW(flags, address, new Uint8Array(out.buffer)) as number) === 0) return 0n;
    return out[0];
  }

  function loadedModules(): bigint[] {
    for (let capacity = 256; ; capacity *= 2) {
      const modules = new BigUint64Array(capacity);
      const needed = new Uint32Array(1);
      const ok = k.K32EnumProcessModules(CURRENT_PROCESS, new Uint8Array(modules.buffer), capacity * 8, new Uint8Array(needed.buffer));
      if (ok === 0) {
        throw new RedefineError("SYMBOL_NOT_FOUND", `cannot list the process's modules (K32EnumProcessModules: ${lastError()}).`);
      }
      if (needed[0] <= capacity * 8) return Array.from(modules.subarray(0, needed[0] / 8));
    }
  }

  function moduleHandle(library: string): bigint {
    const name = wideString(library);
    const handle = (k.GetModuleHandleW(name) as bigint) || (k.LoadLibraryW(name) as bigint);
    if (handle === 0n) {
      throw new RedefineError(
        "LIBRARY_NOT_FOUND",
        `cannot load library '${library}': ${lastError()}. Give a DLL name the loader finds (e.g. ` +
          `"kernel32.dll", "msvcrt.dll") or an absolute path.`,
      );
    }
    return handle;
  }

  /**
   * Where an import thunk at `address` (`jmp qword [rip+disp32]`, optionally REX.W) leads, when it
   * leads into another loaded module; null when `address` is not such a thunk.
   */
  function thunkTarget(address: bigint): bigint | null {
    const code = read(address, 7);
    const at = code[0] === 0x48 ? 1 : 0;
    if (code[at] !== 0xff || code[at + 1] !== 0x25) return null; // jmp qword [rip+disp32]
    const slot = address + BigInt(at + 6) + BigInt(new DataView(code.buffer).getInt32(at + 2, true));
    const home = moduleOf(address);
    if (home === 0n || moduleOf(slot) !== home) return null; // not its own module's import table
    const target = u64(read(slot, 8));
    const there = target === 0n ? 0n : moduleOf(target);
    return there !== 0n && there !== home ? target : null;
  }

  /** Export RVAs to names, for messages. */
  function exportsOf(module: bigint): Map<bigint, string> {
    let names = exportNames.get(module);
    if (names) return names;
    names = new Map();
    const header = module + BigInt(u32(read(module + 0x3cn, 4)));
    // PE32+ optional header at +24; the export data directory is its first, at +112.
    const directory = read(header + 24n + 112n, 8);
    if (u32(directory) !== 0) {
      const exports = read(module + BigInt(u32(directory)), 40);
      const count = u32(exports, 24);
      const functions = read(module + BigInt(u32(exports, 28)), 4 * u32(exports, 20));
      const namePointers = read(module + BigInt(u32(exports, 32)), 4 * count);
      const ordinals = read(module + BigInt(u32(exports, 36)), 2 * count);
      for (let i = 0; i < count; i++) {
        const ordinal = new DataView(ordinals.buffer).getUint16(2 * i, true);
        const rva = BigInt(u32(functions, 4 * ordinal));
        if (!names.has(rva)) names.set(rva, runtime.cString(module + BigInt(u32(namePointers, 4 * i))));
      }
    }
    exportNames.set(module, names);
    return names;
  }

  /** Reads `length` bytes at `address` once every page of them is committed and readable. */
  const checkedRead: Reader = (address, length) => {
    const end = address + BigInt(length);
    for (let at = address; at < end;) {
      const m = mappingAt(at);
      if (m === null || !(m.protection & PROT_READ)) {
        throw new RedefineError(
          "INVALID_ADDRESS",
          `${length} bytes at ${hex(address)} are not readable memory (${hex(at)} is ` +
            `${m === null ? "not committed" : protectionText(m.protection)}): the module is not what its ` +
            `headers say, or it was unloaded meanwhile.`,
        );
      }
      at = m.end;
    }
    return read(address, length);
  };

  function listModules(): LoadedModule[] {
    return loadedModules().map((base) => {
      const path = moduleFileName(base);
      const size = peImageSize(checkedRead, base);
      return { name: path.slice(Math.max(path.lastIndexOf("\\"), path.lastIndexOf("/")) + 1), path, base,
        size: Math.ceil(size / pageSize) * pageSize };
    });
  }

  /** `module`'s base, once it is known to be loaded still. */
  function loaded(module: LoadedModule): bigint {
    if (!loadedModules().includes(module.base)) {
      throw new RedefineError(
        "LIBRARY_NOT_FOUND",
        `'${module.name}' at ${hex(module.base)} is no longer loaded: list the modules again.`,
      );
    }
    return module.base;
  }

  return {
    moduleFileName,

    symbolAddress(symbol, library) {
      const name = ansiString(symbol);
      let address = 0n;
      if (library !== undefined) {
        address = k.GetProcAddress(moduleHandle(library), name) as bigint;
      } else {
        for (const module of loadedModules()) {
          address = k.GetProcAddress(module, name) as bigint;
          if (address !== 0n) break;
        }
      }
      if (address === 0n) {
        throw new RedefineError(
          "SYMBOL_NOT_FOUND",
          `no symbol '${symbol}' in ${library === undefined ? "any loaded module" : `'${library}'`}. Check ` +
            `the exported name (C names; for Win32 APIs with text, the A or W form, e.g. "GetModuleHandleW")` +
            (library === undefined ? ", or name its DLL with { library }." : "."),
        );
      }
      for (let i = 0; i < MAX_THUNKS; i++) {
        const target = thunkTarget(address);
        if (target === null) break;
        address = target;
      }
      return address;
    },

    symbolAt(address) {
      const module = moduleOf(address);
      const base = new BigUint64Array(1);
      const entry = nt.RtlLookupFunctionEntry(address, new Uint8Array(base.buffer), 0n) as bigint;
      const library = module === 0n ? "" : moduleFileName(module);
      const names = module === 0n ? new Map<bigint, string>() : exportsOf(module);
      if (entry !== 0n) {
        // RUNTIME_FUNCTION: BeginAddress, EndAddress, UnwindData (RVAs from the image base).
        const fn = read(entry, 12);
        const start = base[0] + BigInt(u32(fn, 0));
        return {
          name: names.get(start - module) ?? "",
          start,
          size: u32(fn, 4) - u32(fn, 0),
          library,
        } satisfies SymbolInfo;
      }
      const name = names.get(address - module);
      return name === undefined ? null : { name, start: address, size: 0, library };
    },

    modules: listModules,

    exports(module) {
      const base = loaded(module);
      return peExports(checkedRead, base).flatMap((e): ModuleExport[] => {
        // A forwarder is where the loader's lookup leads, as for any caller of GetProcAddress.
        const address = e.forwarder === undefined ? e.address : k.GetProcAddress(base, ansiString(e.name)) as bigint;
        if (address === 0n) return [];
        return [{ name: e.name, address, size: e.size, kind: e.executable ? "function" : "data", default: true }];
      });
    },

    imports(module) {
      return peImports(checkedRead, loaded(module)).map(({ name, from, slot, target }) => ({
        name, slot, target, kind: "iat" as const, from,
      }));
    },
  };
}
