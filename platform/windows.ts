/**
 * Windows x64 memory services through kernel32 (and ntdll's unwind tables), called with the
 * runtime's FFI.
 *
 * - Symbols, extents and introspection: platform/windows_modules.ts (`GetProcAddress` following
 *   import thunks, `.pdata` extents, export directories and import address tables).
 * - Writes: `VirtualProtect(PAGE_EXECUTE_READWRITE)`, and back to exactly the protection it
 *   returned (`PAGE_EXECUTE_WRITECOPY`, guard bits... survive), then
 *   `FlushInstructionCache(GetCurrentProcess(), address, size)`, as the Windows API requires.
 *   Never `WriteProcessMemory` on this process: it changes the same protections itself, and is
 *   slower (see `forceWrite`).
 * - Our own code: a pagefile-backed section mapped twice, read+execute at a free, 64 KiB-aligned
 *   address near the target (found by a `VirtualQuery` walk) and read+write anywhere, so none of
 *   our pages is writable and executable (a single `VirtualAlloc` region would have to be both);
 *   the data pages after the code are the same view's, left read+write.
 * - Stub libraries (`loadableImage`): the ELF stub image of platform/image/elf.ts, rewritten as
 *   a PE DLL with the same code at the same relative places (platform/image/pe.ts), in the temp
 *   directory.
 */
import { hex, RedefineError } from "../src/errors.ts";
import { nearCandidates, protectionText } from "./address_space.ts";
import { peFromStubElf } from "./image/pe.ts";
import type { Mapping, Os, Runtime } from "./types.ts";
import { PROT_EXEC, PROT_READ, PROT_WRITE } from "./types.ts";
import {
  CREATE_NEW,
  CURRENT_PROCESS,
  FILE_ATTRIBUTE_NORMAL,
  FILE_MAP_EXECUTE,
  FILE_MAP_READ,
  FILE_MAP_WRITE,
  FILE_SHARE_READ,
  GENERIC_WRITE,
  INVALID_HANDLE_VALUE,
  kernel32,
  lastErrorText,
  MBI_BYTES,
  MBI_SIZE,
  MEM_COMMIT,
  MEM_FREE,
  MEM_IMAGE,
  ntdll,
  PAGE_EXECUTE,
  PAGE_EXECUTE_READ,
  PAGE_EXECUTE_READWRITE,
  PAGE_EXECUTE_WRITECOPY,
  PAGE_GUARD,
  PAGE_NOACCESS,
  PAGE_READONLY,
  PAGE_READWRITE,
  PAGE_WRITECOPY,
  wideString,
} from "./windows_api.ts";
import { windowsModules } from "./windows_modules.ts";

export { wideString } from "./windows_api.ts";

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
  let images = 0;

  const u32 = (bytes: Uint8Array, at = 0) => new DataView(bytes.buffer, bytes.byteOffset).getUint32(at, true);

  const lastError = () => lastErrorText(k);

  /** MEMORY_BASIC_INFORMATION of the region at `address`, into `into` (fresh by default). */
  function query(address: bigint, into = new Uint8Array(MBI_SIZE)): DataView | null {
    if ((k.VirtualQuery(address, into, MBI_BYTES) as bigint) === 0n) return null;
    return new DataView(into.buffer);
  }
  // mappingAt and protect run for every page a write touches: one buffer each for all their calls.
  const scratch = new Uint8Array(MBI_SIZE);
  const oldProtection = new Uint8Array(4);

  /**
   * The committed region at `address` (from the page asked about, as VirtualQuery tells it), with
   * the allocation holding it, or null.
   */
  function mappingAt(address: bigint): Mapping | null {
    const mbi = query(address, scratch);
    if (!mbi || mbi.getUint32(32, true) !== MEM_COMMIT) return null;
    const start = mbi.getBigUint64(0, true);
    return {
      start,
      end: start + mbi.getBigUint64(24, true),
      protection: protectionBits(mbi.getUint32(36, true)),
      path: "",
      allocation: { base: mbi.getBigUint64(8, true), kind: mbi.getUint32(40, true) },
    };
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

  const modules = windowsModules(runtime, k, nt, pageSize, mappingAt);

  const os: Os = {
    pageSize,

    symbolAddress: modules.symbolAddress,
    symbolAt: modules.symbolAt,
    modules: modules.modules,
    exports: modules.exports,
    imports: modules.imports,


    mappings() {
      const found: Mapping[] = [];
      for (const { start, end, mbi } of regions(lowest, highest)) {
        if (mbi.getUint32(32, true) !== MEM_COMMIT) continue;
        const image = mbi.getUint32(40, true) === MEM_IMAGE;
        found.push({
          start,
          end,
          protection: protectionBits(mbi.getUint32(36, true)),
          path: image ? modules.moduleFileName(mbi.getBigUint64(8, true)) : "",
        });
      }
      return found;
    },

    mappingAt,

    protect(start, length, protection) {
      const before = saved.get(start);
      const restoring = before !== undefined && protectionBits(before) === protection;
      const value = restoring ? before : pageProtection(protection);
      if ((k.VirtualProtect(start, BigInt(length), value, oldProtection) as number) === 0) {
        throw new RedefineError(
          "PROTECT_FAILED",
          `VirtualProtect(${hex(start)}, ${length}, ${hex(value)} [${protectionText(protection)}]) failed: ` +
            `${lastError()}. Windows refuses to change this memory's protection (a process with ` +
            `arbitrary code guard, or memory that is not the process's own); redefine a function of ` +
            `another module.`,
        );
      }
      const old = u32(oldProtection);
      if (restoring) saved.delete(start);
      else if (protection & PROT_WRITE && !(protectionBits(old) & PROT_WRITE)) saved.set(start, old);
    },

    allocateCode(near, reach, codeSize, wanted = pageSize) {
      // Whole pages: the data page's VirtualProtect must not reach back into the code's last page.
      const size = Math.ceil(codeSize / pageSize) * pageSize;
      const dataSize = Math.max(1, Math.ceil(wanted / pageSize)) * pageSize;
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

    // No forced write: WriteProcessMemory on this process is no /proc/self/mem. On a read+execute
    // page it makes the page writable+executable itself (Wine: PAGE_EXECUTE_WRITECOPY, then the
    // write as a wineserver request, then the old protection back), so no page stays closed; it
    // refuses PAGE_READONLY pages (ERROR_NOACCESS); and under Wine, where the write itself is a
    // wineserver request, a write and its undo cost 3-108x (3-5x on a quiet machine) the same two
    // writes between VirtualProtect pairs (bench/windows_write.bench.ts).
    forceWrite() {
      return false;
    },

    flushCode(address, length) {
      k.FlushInstructionCache(CURRENT_PROCESS, address, BigInt(length));
    },

  };
  return os;
}
