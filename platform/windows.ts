/**
 * Windows x64 memory services through kernel32 (and ntdll's unwind tables), called with the
 * runtime's FFI.
 *
 * - Symbols: `GetModuleHandleW`, else `LoadLibraryW`, then `GetProcAddress`; with no library, every
 *   loaded module in load order (`K32EnumProcessModules`), the first that exports the name wins.
 *   An export that is only an import thunk — `jmp [rip+x]` through its module's import table into
 *   another module, as many kernel32 exports are into kernelbase — is followed to the function it
 *   jumps to: that is what callers run, including the many that import it from the other module
 *   directly, so the patch goes there and the Patch's `address` names it.
 * - Extent: the `.pdata` entry holding the address (`RtlLookupFunctionEntry`): from its begin to its
 *   end. Leaf functions have none: size 0, and `src/` falls back to the straight-line length of an
 *   exported entry or asks for `{ size }`.
 * - Writes: `VirtualProtect(PAGE_EXECUTE_READWRITE)`, and back to exactly the protection it
 *   returned (`PAGE_EXECUTE_WRITECOPY`, guard bits... survive), then
 *   `FlushInstructionCache(GetCurrentProcess(), address, size)`, as the Windows API requires.
 * - Our own code: a pagefile-backed section mapped twice, read+execute at a free, 64 KiB-aligned
 *   address near the target (found by a `VirtualQuery` walk) and read+write anywhere, so none of
 *   our pages is writable and executable (a single `VirtualAlloc` region would have to be both);
 *   the data pages after the code are the same view's, left read+write.
 * - Introspection: the modules `K32EnumProcessModules` lists, each image's export directory and
 *   import address table read from memory (platform/image/pe_loaded.ts), every read checked with
 *   `VirtualQuery` first.
 * - Stub libraries (`loadableImage`): the ELF stub image of platform/image/elf.ts, rewritten as
 *   a PE DLL with the same code at the same relative places (platform/image/pe.ts), in the temp
 *   directory.
 */
import { hex, RedefineError } from "../src/errors.ts";
import { nearCandidates, protectionText } from "./address_space.ts";
import { peFromStubElf } from "./image/pe.ts";
import { peExports, peImageSize, peImports } from "./image/pe_loaded.ts";
import type { Reader } from "./image/elf_loaded.ts";
import type { LoadedModule, Mapping, ModuleExport, Os, Runtime, SymbolInfo } from "./types.ts";
import { PROT_EXEC, PROT_READ, PROT_WRITE } from "./types.ts";

const PAGE_NOACCESS = 0x01;
const PAGE_READONLY = 0x02;
const PAGE_READWRITE = 0x04;
const PAGE_WRITECOPY = 0x08;
const PAGE_EXECUTE = 0x10;
const PAGE_EXECUTE_READ = 0x20;
const PAGE_EXECUTE_READWRITE = 0x40;
const PAGE_EXECUTE_WRITECOPY = 0x80;
const PAGE_GUARD = 0x100;
const MEM_COMMIT = 0x1000;
const MEM_FREE = 0x10000;
const MEM_IMAGE = 0x1000000;
const FILE_MAP_WRITE = 0x2;
const FILE_MAP_READ = 0x4;
const FILE_MAP_EXECUTE = 0x20;
const GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT = 0x2;
const GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS = 0x4;
const INVALID_HANDLE_VALUE = 2n ** 64n - 1n;
const GENERIC_WRITE = 0x40000000;
const FILE_SHARE_READ = 1;
const CREATE_NEW = 1;
const FILE_ATTRIBUTE_NORMAL = 0x80;
/** `GetCurrentProcess()`'s pseudo handle. */
const CURRENT_PROCESS = -1n;
/** MEMORY_BASIC_INFORMATION on x64. */
const MBI_SIZE = 48;
/** How many thunks in a row are followed before giving up (a cycle, or a chain of forwarders). */
const MAX_THUNKS = 4;

const ERROR_NAMES: Record<number, string> = {
  2: "ERROR_FILE_NOT_FOUND",
  5: "ERROR_ACCESS_DENIED",
  6: "ERROR_INVALID_HANDLE",
  8: "ERROR_NOT_ENOUGH_MEMORY",
  87: "ERROR_INVALID_PARAMETER",
  126: "ERROR_MOD_NOT_FOUND",
  127: "ERROR_PROC_NOT_FOUND",
  193: "ERROR_BAD_EXE_FORMAT",
  487: "ERROR_INVALID_ADDRESS",
  998: "ERROR_NOACCESS",
};

function kernel32(runtime: Runtime) {
  return runtime.open("kernel32.dll", {
    GetLastError: { parameters: [], result: "u32" },
    GetSystemInfo: { parameters: ["buffer"], result: "void" },
    // A pseudo handle, -1: as i64, since Bun would hand an unsigned 2^64-1 over as a lossy number.
    GetCurrentProcess: { parameters: [], result: "i64" },
    GetCurrentProcessId: { parameters: [], result: "u32" },
    GetModuleHandleW: { parameters: ["buffer"], result: "usize" },
    GetModuleHandleExW: { parameters: ["u32", "usize", "buffer"], result: "i32" },
    LoadLibraryW: { parameters: ["buffer"], result: "usize" },
    GetProcAddress: { parameters: ["usize", "buffer"], result: "usize" },
    GetModuleFileNameW: { parameters: ["usize", "buffer", "u32"], result: "u32" },
    K32EnumProcessModules: { parameters: ["i64", "buffer", "u32", "buffer"], result: "i32" },
    VirtualProtect: { parameters: ["usize", "usize", "u32", "buffer"], result: "i32" },
    VirtualQuery: { parameters: ["usize", "buffer", "usize"], result: "usize" },
    FlushInstructionCache: { parameters: ["i64", "usize", "usize"], result: "i32" },
    CreateFileMappingW: { parameters: ["usize", "usize", "u32", "u32", "u32", "usize"], result: "usize" },
    MapViewOfFileEx: { parameters: ["usize", "u32", "u32", "u32", "usize", "usize"], result: "usize" },
    UnmapViewOfFile: { parameters: ["usize"], result: "i32" },
    CloseHandle: { parameters: ["usize"], result: "i32" },
    GetTempPathW: { parameters: ["u32", "buffer"], result: "u32" },
    CreateFileW: { parameters: ["buffer", "u32", "u32", "usize", "u32", "u32", "usize"], result: "usize" },
    WriteFile: { parameters: ["usize", "buffer", "u32", "buffer", "usize"], result: "i32" },
  });
}

function ntdll(runtime: Runtime) {
  return runtime.open("ntdll.dll", {
    RtlLookupFunctionEntry: { parameters: ["u64", "buffer", "usize"], result: "usize" },
  });
}

/** A NUL-terminated UTF-16 string, as the `W` functions take it. */
export function wideString(text: string): Uint8Array {
  const units = new Uint16Array(text.length + 1);
  for (let i = 0; i < text.length; i++) units[i] = text.charCodeAt(i);
  return new Uint8Array(units.buffer);
}

function ansiString(text: string): Uint8Array {
  return new TextEncoder().encode(text + "\0");
}

/** The `PROT_*` bits of a `PAGE_*` protection. */
export function protectionBits(page: number): number {
  if (page & PAGE_GUARD) return 0;
  switch (page & 0xff) {
    case PAGE_READONLY:
      return PROT_READ;
    case PAGE_READWRITE:
    case PAGE_WRITECOPY:
      return PROT_READ | PROT_WRITE;
    case PAGE_EXECUTE:
      return PROT_EXEC;
    case PAGE_EXECUTE_READ:
      return PROT_READ | PROT_EXEC;
    case PAGE_EXECUTE_READWRITE:
    case PAGE_EXECUTE_WRITECOPY:
      return PROT_READ | PROT_WRITE | PROT_EXEC;
    default:
      return 0;
  }
}

/** The `PAGE_*` protection for `PROT_*` bits (write without read is read+write, as on POSIX). */
export function pageProtection(bits: number): number {
  const exec = bits & PROT_EXEC;
  if (bits & PROT_WRITE) return exec ? PAGE_EXECUTE_READWRITE : PAGE_READWRITE;
  if (bits & PROT_READ) return exec ? PAGE_EXECUTE_READ : PAGE_READONLY;
  return exec ? PAGE_EXECUTE : PAGE_NOACCESS;
}

/** The Windows layer over `runtime`. */
export function windows(runtime: Runtime): Os {
  const k = kernel32(runtime);
  const nt = ntdll(runtime);
  const system = new Uint8Array(48);
  k.GetSystemInfo(system);
  const info = new DataView(system.buffer);
  const pageSize = info.getUint32(4, true);
  const granularity = BigInt(info.getUint32(40, true));
  const lowest = info.getBigUint64(8, true);
  const highest = info.getBigUint64(16, true);
  /** Protections VirtualProtect returned when a page was made writable, to put back exactly. */
  const saved = new Map<bigint, number>();
  const exportNames = new Map<bigint, Map<bigint, string>>();
  let images = 0;

  const read = (address: bigint, length: number) => runtime.view(address, length).slice();
  const u32 = (bytes: Uint8Array, at = 0) => new DataView(bytes.buffer, bytes.byteOffset).getUint32(at, true);
  const u64 = (bytes: Uint8Array, at = 0) => new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(at, true);

  function lastError(): string {
    const code = k.GetLastError() as number;
    return `${ERROR_NAMES[code] ?? "error"} (${code})`;
  }

  function query(address: bigint): DataView | null {
    const mbi = new Uint8Array(MBI_SIZE);
    if ((k.VirtualQuery(address, mbi, BigInt(MBI_SIZE)) as bigint) === 0n) return null;
    return new DataView(mbi.buffer);
  }

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

  function mappingAt(address: bigint): Mapping | null {
    const mbi = query(address);
    if (!mbi || mbi.getUint32(32, true) !== MEM_COMMIT) return null;
    const start = mbi.getBigUint64(0, true);
    return { start, end: start + mbi.getBigUint64(24, true), protection: protectionBits(mbi.getUint32(36, true)), path: "" };
  }

  /** Every region from `from` to `to`, committed, reserved or free, in address order. */
  function regions(from: bigint, to: bigint): { start: bigint; end: bigint; mbi: DataView }[] {
    const found: { start: bigint; end: bigint; mbi: DataView }[] = [];
    for (let address = from; address < to;) {
      const mbi = query(address);
      if (!mbi) break;
      const start = mbi.getBigUint64(0, true), end = start + mbi.getBigUint64(24, true);
      if (end <= address) break;
      found.push({ start, end, mbi });
      address = end;
    }
    return found;
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

  function writeFile(path: string, bytes: Uint8Array): void {
    const file = k.CreateFileW(wideString(path), GENERIC_WRITE, FILE_SHARE_READ, 0n, CREATE_NEW, FILE_ATTRIBUTE_NORMAL, 0n) as bigint;
    if (file === INVALID_HANDLE_VALUE) {
      throw new RedefineError("ALLOCATION_FAILED", `cannot create the stub library '${path}': ${lastError()}.`);
    }
    try {
      const written = new Uint32Array(1);
      if ((k.WriteFile(file, bytes, bytes.length, new Uint8Array(written.buffer), 0n) as number) === 0 || written[0] !== bytes.length) {
        throw new RedefineError("ALLOCATION_FAILED", `cannot write the stub library '${path}': ${lastError()}.`);
      }
    } finally {
      k.CloseHandle(file);
    }
  }

  const os: Os = {
    pageSize,

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

    mappings() {
      const found: Mapping[] = [];
      for (const { start, end, mbi } of regions(lowest, highest)) {
        if (mbi.getUint32(32, true) !== MEM_COMMIT) continue;
        const image = mbi.getUint32(40, true) === MEM_IMAGE;
        found.push({
          start,
          end,
          protection: protectionBits(mbi.getUint32(36, true)),
          path: image ? moduleFileName(mbi.getBigUint64(8, true)) : "",
        });
      }
      return found;
    },

    mappingAt,

    protect(start, length, protection) {
      const before = saved.get(start);
      const restoring = before !== undefined && protectionBits(before) === protection;
      const value = restoring ? before : pageProtection(protection);
      const old = new Uint32Array(1);
      if ((k.VirtualProtect(start, BigInt(length), value, new Uint8Array(old.buffer)) as number) === 0) {
        throw new RedefineError(
          "PROTECT_FAILED",
          `VirtualProtect(${hex(start)}, ${length}, ${hex(value)} [${protectionText(protection)}]) failed: ` +
            `${lastError()}. Windows refuses to change this memory's protection (a process with ` +
            `arbitrary code guard, or memory that is not the process's own); redefine a function of ` +
            `another module.`,
        );
      }
      if (restoring) saved.delete(start);
      else if (protection & PROT_WRITE && !(protectionBits(old[0]) & PROT_WRITE)) saved.set(start, old[0]);
    },

    allocateCode(near, reach, size) {
      const dataSize = pageSize;
      const total = size + dataSize;
      const span = (BigInt(total) + granularity - 1n) / granularity * granularity;
      const from = near - reach > lowest ? near - reach : lowest;
      const occupied = regions(from, near + reach < highest ? near + reach : highest)
        .filter((r) => r.mbi.getUint32(32, true) !== MEM_FREE)
        .map((r) => ({ start: r.start, end: r.end, protection: 0, path: "" }));
      const candidates = nearCandidates(occupied, near, reach, span, granularity)
        .filter((at) => at >= lowest && at + span <= highest + 1n);
      if (candidates.length === 0) return null;
      const section = k.CreateFileMappingW(INVALID_HANDLE_VALUE, 0n, PAGE_EXECUTE_READWRITE, 0, total, 0n) as bigint;
      if (section === 0n) {
        throw new RedefineError("ALLOCATION_FAILED", `CreateFileMappingW for a code block failed: ${lastError()}.`);
      }
      try {
        for (const at of candidates.slice(0, 16)) {
          const access = FILE_MAP_READ | FILE_MAP_WRITE | FILE_MAP_EXECUTE;
          const address = k.MapViewOfFileEx(section, access, 0, 0, BigInt(total), at) as bigint;
          if (address === 0n) continue;
          const old = new Uint8Array(4);
          const writable = k.MapViewOfFileEx(section, FILE_MAP_WRITE, 0, 0, BigInt(size), 0n) as bigint;
          if (
            writable === 0n ||
            (k.VirtualProtect(address, BigInt(size), PAGE_EXECUTE_READ, old) as number) === 0 ||
            (k.VirtualProtect(address + BigInt(size), BigInt(dataSize), PAGE_READWRITE, old) as number) === 0
          ) {
            const why = lastError();
            if (writable !== 0n) k.UnmapViewOfFile(writable);
            k.UnmapViewOfFile(address);
            throw new RedefineError("ALLOCATION_FAILED", `mapping a code block at ${hex(at)} failed: ${why}.`);
          }
          return { address, writable, size, data: address + BigInt(size), dataSize };
        }
        return null;
      } finally {
        k.CloseHandle(section);
      }
    },

    loadableImage(image) {
      const temp = new Uint16Array(261);
      const n = k.GetTempPathW(temp.length, new Uint8Array(temp.buffer)) as number;
      if (n === 0 || n >= temp.length) {
        throw new RedefineError("ALLOCATION_FAILED", `no temp directory for the stub library: ${lastError()}.`);
      }
      const directory = String.fromCharCode(...temp.subarray(0, n));
      const stamp = `${k.GetCurrentProcessId()}-${images++}-${Date.now().toString(36)}`;
      const path = `${directory}redefine-stubs-${stamp}.dll`;
      writeFile(path, peFromStubElf(image, `redefine-stubs-${stamp}.dll`));
      return path;
    },

    // WriteProcessMemory on this process would be the counterpart of Linux's /proc/self/mem; until
    // it is measured against VirtualProtect pairs under Wine, every write makes its pages writable.
    forceWrite() {
      return false;
    },

    flushCode(address, length) {
      k.FlushInstructionCache(CURRENT_PROCESS, address, BigInt(length));
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
  return os;
}
