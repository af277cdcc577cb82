/**
 * What the macOS layer knows of loaded images: dyld's image list (`_dyld_image_count`,
 * `_dyld_get_image_header`, `_dyld_get_image_name`), each image's export trie and symbol pointers
 * (platform/image/macho_loaded.ts), and function extents from its `LC_FUNCTION_STARTS` table (from
 * a function's start to the next, the last ending with `__TEXT,__text`; `dladdr` names them). Every
 * read is checked against the memory map first.
 */
import { hex, RedefineError } from "../src/errors.ts";
import { machoExports, machoImports, machoText } from "./image/macho_loaded.ts";
import type { Reader } from "./image/elf_loaded.ts";
import type { LoadedModule, Mapping, ModuleExport, NativeCall, Os, Runtime, SymbolInfo } from "./types.ts";
import { PROT_READ } from "./types.ts";

/** Where libSystem lives (only in the shared cache on macOS 11+, but dlopen finds it by path). */
export const LIBSYSTEM = "/usr/lib/libSystem.B.dylib";

const MH_MAGIC_64 = 0xfeedfacf;
const LC_SEGMENT_64 = 0x19;
const LC_FUNCTION_STARTS = 0x26;

/** One image's function starts, as absolute addresses, closed by the end of its `__text`. */
interface FunctionStarts {
  readonly starts: bigint[];
  readonly textEnd: bigint;
}

/** Decodes `LC_FUNCTION_STARTS` data: ULEB128 deltas from `base`, ended by a zero delta. */
export function decodeFunctionStarts(data: Uint8Array, base: bigint): bigint[] {
  const starts: bigint[] = [];
  let address = base;
  for (let i = 0; i < data.length;) {
    let delta = 0n;
    let shift = 0n;
    let byte: number;
    do {
      byte = data[i++];
      delta |= BigInt(byte & 0x7f) << shift;
      shift += 7n;
    } while (byte & 0x80 && i < data.length);
    if (delta === 0n) break;
    address += delta;
    starts.push(address);
  }
  return starts;
}

/** The image services of the macOS `Os`, over the memory map `mappingAt` reads. */
export function darwinImages(
  runtime: Runtime,
  c: { readonly dladdr: NativeCall },
  pageSize: number,
  mappingAt: (address: bigint) => Mapping | null,
): Pick<Os, "symbolAt" | "modules" | "exports" | "imports"> {
  const page = BigInt(pageSize);
  const u32 = (bytes: Uint8Array, at = 0) => new DataView(bytes.buffer, bytes.byteOffset).getUint32(at, true);
  const u64 = (bytes: Uint8Array, at = 0) => new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(at, true);
  const read = (address: bigint, length: number) => runtime.view(address, length).slice();

  /** The readable bytes at `address`, or null when any of them is unmapped or unreadable. */
  function readChecked(address: bigint, length: number): Uint8Array | null {
    for (let p = address - address % page; p < address + BigInt(length); p += page) {
      const m = mappingAt(p);
      if (!m || !(m.protection & PROT_READ)) return null;
    }
    return read(address, length);
  }

  const functionStartsCache = new Map<bigint, FunctionStarts | null>();

  /** The function starts of the Mach-O image whose header is at `header`. */
  function functionStartsOf(header: bigint): FunctionStarts | null {
    if (functionStartsCache.has(header)) return functionStartsCache.get(header)!;
    let result: FunctionStarts | null = null;
    const head = readChecked(header, 32);
    if (head && u32(head, 0) === MH_MAGIC_64) {
      const commands = readChecked(header + 32n, u32(head, 20));
      let text: { vmaddr: bigint; textEnd: bigint } | null = null;
      let linkedit: { vmaddr: bigint; fileoff: bigint } | null = null;
      let startsAt: { offset: number; size: number } | null = null;
      for (let at = 0, i = 0; commands && i < u32(head, 16) && at + 8 <= commands.length; i++) {
        const cmd = u32(commands, at), size = u32(commands, at + 4);
        if (size < 8) break;
        if (cmd === LC_SEGMENT_64) {
          const name = new TextDecoder().decode(commands.subarray(at + 8, at + 24)).replace(/\0.*$/s, "");
          const vmaddr = u64(commands, at + 24);
          if (name === "__TEXT") {
            let textEnd = vmaddr + u64(commands, at + 32);
            // section_64 records (80 bytes) follow the 72-byte segment command.
            for (let s = 0; s < u32(commands, at + 64); s++) {
              const section = at + 72 + 80 * s;
              const sectionName = new TextDecoder().decode(commands.subarray(section, section + 16)).replace(/\0.*$/s, "");
              if (sectionName === "__text") textEnd = u64(commands, section + 32) + u64(commands, section + 40);
            }
            text = { vmaddr, textEnd };
          }
          if (name === "__LINKEDIT") linkedit = { vmaddr, fileoff: u64(commands, at + 40) };
        }
        if (cmd === LC_FUNCTION_STARTS) startsAt = { offset: u32(commands, at + 8), size: u32(commands, at + 12) };
        at += size;
      }
      if (text && linkedit && startsAt) {
        const slide = header - text.vmaddr;
        // The data's file offset counts in the same file as __LINKEDIT's (the shared cache's, for
        // its images), so its address is the segment's, moved by the offset difference.
        const data = readChecked(linkedit.vmaddr + slide - linkedit.fileoff + BigInt(startsAt.offset), startsAt.size);
        if (data) result = { starts: decodeFunctionStarts(data, header), textEnd: text.textEnd + slide };
      }
    }
    functionStartsCache.set(header, result);
    return result;
  }

  /** `readChecked` for the image readers: unreadable bytes are INVALID_ADDRESS. */
  const checkedRead: Reader = (address, length) => {
    const bytes = readChecked(address, length);
    if (bytes === null) {
      throw new RedefineError(
        "INVALID_ADDRESS",
        `${length} bytes at ${hex(address)} are not readable memory: the image is not what its load ` +
          `commands say, or it was unloaded meanwhile.`,
      );
    }
    return bytes;
  };

  /** dyld's list of images, bound when first asked for. */
  let dyld: Record<"_dyld_image_count" | "_dyld_get_image_header" | "_dyld_get_image_name", NativeCall> | undefined;

  /** The images dyld has loaded, in load order (the main executable first): header and path. */
  function images(): { header: bigint; path: string }[] {
    dyld ??= runtime.open(LIBSYSTEM, {
      _dyld_image_count: { parameters: [], result: "u32" },
      _dyld_get_image_header: { parameters: ["u32"], result: "usize" },
      _dyld_get_image_name: { parameters: ["u32"], result: "usize" },
    });
    const list = dyld;
    return Array.from({ length: list._dyld_image_count() as number }, (_, i) => {
      const name = list._dyld_get_image_name(i) as bigint;
      return { header: list._dyld_get_image_header(i) as bigint, path: name === 0n ? "" : runtime.cString(name) };
    }).filter((image) => image.header !== 0n);
  }

  /** `module`'s header, once it is known to be loaded still. */
  function loaded(module: LoadedModule): bigint {
    if (!images().some((image) => image.header === module.base)) {
      throw new RedefineError(
        "LIBRARY_NOT_FOUND",
        `'${module.name}' at ${hex(module.base)} is no longer loaded: list the modules again.`,
      );
    }
    return module.base;
  }

  /** Function lengths by start, from the image's function starts: to the next start; 0 when unknown. */
  function functionSizes(header: bigint): (address: bigint) => number {
    const table = functionStartsOf(header);
    if (!table) return () => 0;
    const index = new Map(table.starts.map((start, i) => [start, i]));
    return (address) => {
      const i = index.get(address);
      if (i === undefined) return 0;
      return Number((i + 1 < table.starts.length ? table.starts[i + 1] : table.textEnd) - address);
    };
  }

  return {
    symbolAt(address) {
      const info = new Uint8Array(32);
      if ((c.dladdr(address, info) as number) === 0) return null;
      // Dl_info: dli_fname, dli_fbase, dli_sname, dli_saddr.
      const fileName = u64(info, 0), base = u64(info, 8), symbolName = u64(info, 16), symbolAddress = u64(info, 24);
      const name = symbolName === 0n ? "" : runtime.cString(symbolName);
      const library = fileName === 0n ? "" : runtime.cString(fileName);
      const table = base === 0n ? null : functionStartsOf(base);
      if (table) {
        const { starts, textEnd } = table;
        let i = starts.length - 1;
        while (i >= 0 && starts[i] > address) i--;
        const end = i + 1 < starts.length ? starts[i + 1] : textEnd;
        if (i >= 0 && address < end) {
          const start = starts[i];
          return {
            name: start === symbolAddress || name === "" ? name : `${name}+${hex(start - symbolAddress)}`,
            start,
            size: Number(end - start),
            library,
          } satisfies SymbolInfo;
        }
      }
      if (symbolName === 0n) return null;
      return { name, start: symbolAddress, size: 0, library } satisfies SymbolInfo;
    },

    modules() {
      return images().map(({ header, path }) => {
        const text = machoText(checkedRead, header);
        return { name: path.slice(path.lastIndexOf("/") + 1), path, base: text.base,
          size: Math.ceil(text.size / pageSize) * pageSize };
      });
    },

    exports(module) {
      const header = loaded(module);
      const sizeOf = functionSizes(header);
      return machoExports(checkedRead, header).map((e): ModuleExport => ({
        name: e.name,
        address: e.address,
        size: e.executable ? sizeOf(e.address) : 0,
        kind: e.executable ? "function" : "data",
        default: true,
      }));
    },

    imports(module) {
      return machoImports(checkedRead, loaded(module));
    },
  };
}
