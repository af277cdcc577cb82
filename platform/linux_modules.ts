/**
 * What the Linux layer knows of loaded modules: the loader's list (`dl_iterate_phdr`, the main
 * executable first, the vDSO by its soname), each image's exports and import slots read from its
 * dynamic section (platform/image/elf_loaded.ts; indirect functions resolved as `dlsym` resolves
 * them), and the main program's text. Every read is checked against the memory map first.
 */
import { hex, RedefineError } from "../src/errors.ts";
import type { AddressRange, LoadedModule, Mapping, ModuleExport, NativeCall, Os, Runtime } from "./types.ts";
import { PROT_READ } from "./types.ts";
import { protectionText } from "./address_space.ts";
import { cString } from "./posix.ts";
import { dynamicInfo, exportedSymbols, importSlots, loadedSpan, programHeaders } from "./image/elf_loaded.ts";
import type { ElfExport, ElfMachine, LoadedImage, Reader } from "./image/elf_loaded.ts";

const RTLD_LAZY = 1;
const RTLD_NOLOAD = 4;
const AT_SYSINFO_EHDR = 33n;
const PATH_MAX = 4096;
/** `getauxval` keys: where the kernel put the main program's program headers, and how many. */
const AT_PHDR = 3n;
const AT_PHNUM = 5n;
/** The segment types and the flag the program's text is found by. */
const PT_LOAD = 1;
const PT_PHDR = 6;
const PF_X = 1;

/** The libc functions the module services call. */
type Libc = Record<"dl_iterate_phdr" | "getauxval" | "readlink" | "dlopen" | "dlsym" | "dlvsym" | "dlclose", NativeCall>;

/** The module services of the Linux `Os`, over the process's memory map as `mappings` reads it. */
export function linuxModules(
  runtime: Runtime,
  c: Libc,
  pageSize: number,
  mappings: () => Mapping[],
): Pick<Os, "modules" | "exports" | "imports" | "programText"> {
  /** A reader that refuses any byte outside the readable mappings of this moment. */
  function checkedReader(): Reader {
    const maps = mappings();
    return mappedReader(runtime, (at) => maps.find((m) => at >= m.start && at < m.end) ?? null);
  }

  const machine: ElfMachine = runtime.arch === "aarch64" || runtime.arch === "arm64" ? "aarch64" : "x86_64";

  /** What the loader lists, each with its image; the main executable first. */
  function listModules(): (LoadedModule & { image: LoadedImage })[] {
    const listed: { bias: bigint; name: string; phdr: bigint; phnum: number }[] = [];
    // struct dl_phdr_info: dlpi_addr u64, dlpi_name char*, dlpi_phdr Elf64_Phdr*, dlpi_phnum u16.
    // The callback only copies these out: the loader holds its lock while it runs.
    const callback = runtime.callback(
      { parameters: ["pointer", "usize", "pointer"], result: "i32" },
      (info: bigint | number) => {
        const header = new DataView(runtime.view(BigInt(info), 26).slice().buffer);
        const name = header.getBigUint64(8, true);
        listed.push({
          bias: header.getBigUint64(0, true),
          name: name === 0n ? "" : runtime.cString(name),
          phdr: header.getBigUint64(16, true),
          phnum: header.getUint16(24, true),
        });
        return 0;
      },
    );
    try {
      c.dl_iterate_phdr(callback.address, 0n);
    } finally {
      callback.close();
    }
    const read = checkedReader();
    const vdso = c.getauxval(AT_SYSINFO_EHDR) as bigint;
    const modules: (LoadedModule & { image: LoadedImage })[] = [];
    listed.forEach((entry, i) => {
      if (entry.phnum === 0) return;
      const image = { bias: entry.bias, headers: programHeaders(read, entry.phdr, entry.phnum) };
      const span = loadedSpan(image, pageSize);
      if (span === null) return;
      // The loader lists the main executable first, with no name; the vDSO by its soname.
      const path = i === 0 && entry.name === "" ? executablePath() : span.base === vdso ? "[vdso]" : entry.name;
      const name = span.base === vdso && entry.name !== "" ? entry.name : path.slice(path.lastIndexOf("/") + 1);
      modules.push({ name, path, base: span.base, size: span.size, image });
    });
    return modules;
  }

  function executablePath(): string {
    const buffer = new Uint8Array(PATH_MAX);
    const n = Number(c.readlink(cString("/proc/self/exe"), buffer, BigInt(PATH_MAX)));
    return n > 0 ? new TextDecoder().decode(buffer.subarray(0, n)) : "";
  }

  /** The image of `module` as the loader has it now, and whether it is the main executable. */
  function imageOf(module: LoadedModule): { image: LoadedImage; main: boolean } {
    const all = listModules();
    const found = all.findIndex((m) => m.base === module.base && m.path === module.path);
    if (found < 0) {
      throw new RedefineError(
        "LIBRARY_NOT_FOUND",
        `'${module.name}' at ${hex(module.base)} is no longer loaded: list the modules again.`,
      );
    }
    return { image: all[found]!.image, main: found === 0 };
  }

  /**
   * Replaces each indirect function's resolver by the implementation it picks, as `dlsym` on the
   * module's own handle resolves it (the main executable: first in the default scope).
   */
  function resolveIndirect(symbols: ElfExport[], main: boolean, path: string): ModuleExport[] {
    if (!symbols.some((s) => s.indirect)) return symbols.map(({ indirect: _, ...s }) => s);
    const handle = main ? 0n : c.dlopen(cString(path), RTLD_LAZY | RTLD_NOLOAD) as bigint;
    try {
      return symbols.map(({ indirect, ...symbol }): ModuleExport => {
        if (!indirect || (!main && handle === 0n)) return symbol;
        const address = symbol.version === undefined
          ? c.dlsym(handle, cString(symbol.name)) as bigint
          : c.dlvsym(handle, cString(symbol.name), cString(symbol.version)) as bigint;
        // The implementation's size is not in the table: only the resolver's is.
        return address === 0n ? symbol : { ...symbol, address, size: 0 };
      });
    } finally {
      if (handle !== 0n) c.dlclose(handle);
    }
  }

  // The main program's text, read once: it does not move.
  let programText: AddressRange | null | undefined;

  return {
    programText() {
      programText ??= mainProgramText(checkedReader(), c.getauxval(AT_PHDR) as bigint, Number(c.getauxval(AT_PHNUM)));
      return programText;
    },

    modules() {
      return listModules().map(({ name, path, base, size }) => ({ name, path, base, size }));
    },

    exports(module) {
      const { image, main } = imageOf(module);
      const read = checkedReader();
      const info = dynamicInfo(read, image);
      if (info === null) return [];
      return resolveIndirect(exportedSymbols(read, image, info), main, module.path);
    },

    imports(module) {
      const { image } = imageOf(module);
      const read = checkedReader();
      const info = dynamicInfo(read, image);
      return info === null ? [] : importSlots(read, image, info, machine);
    },
  };
}

/**
 * The main program's executable segments, from the program headers the kernel mapped at `phdr`
 * (`AT_PHDR`): the load bias is where `PT_PHDR` landed minus where it asked to be. Null without
 * `PT_PHDR` or an executable `PT_LOAD`.
 */
function mainProgramText(read: Reader, phdr: bigint, count: number): AddressRange | null {
  if (phdr === 0n || count === 0) return null;
  const segments = programHeaders(read, phdr, count);
  const self = segments.find((s) => s.type === PT_PHDR);
  const text = segments.filter((s) => s.type === PT_LOAD && (s.flags & PF_X) !== 0);
  if (!self || text.length === 0) return null;
  const bias = phdr - self.vaddr;
  return {
    start: bias + text.reduce((low, s) => (s.vaddr < low ? s.vaddr : low), text[0]!.vaddr),
    end: bias + text.reduce((high, s) => (s.vaddr + s.memsz > high ? s.vaddr + s.memsz : high), 0n),
  };
}

/**
 * A reader that refuses any byte outside the readable mappings `mappingAt` finds. The mapping
 * last found is kept, and asked again only for an address outside it: an image's headers and
 * notes lie in its first mapping, so reading them asks once.
 */
export function mappedReader(runtime: Runtime, mappingAt: (address: bigint) => Mapping | null): Reader {
  let known: Mapping | null = null;
  return (address, length) => {
    const end = address + BigInt(length);
    for (let at = address; at < end;) {
      const m = known !== null && at >= known.start && at < known.end ? known : mappingAt(at);
      if (m === null || !(m.protection & PROT_READ)) {
        throw new RedefineError(
          "INVALID_ADDRESS",
          `${length} bytes at ${hex(address)} are not readable memory (${hex(at)} is ` +
            `${m === null ? "unmapped" : protectionText(m.protection)}): the loaded image is not ` +
            `what its headers say, or it was unloaded meanwhile.`,
        );
      }
      known = m;
      at = m.end;
    }
    return runtime.view(address, length).slice();
  };
}
