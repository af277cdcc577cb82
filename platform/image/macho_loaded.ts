/**
 * Reading 64-bit Mach-O images as dyld mapped them (their own files or the shared cache): their
 * `__TEXT` segment, the export trie (`LC_DYLD_EXPORTS_TRIE` or `LC_DYLD_INFO`) and the lazy and
 * non-lazy symbol pointers named through the indirect symbol table. Pure functions over a
 * `read(address, length)` the caller checks against the memory map, as platform/image/elf_loaded.ts
 * does for ELF.
 */
import { hex, RedefineError } from "../../src/errors.ts";
import type { Reader } from "./elf_loaded.ts";

/** An export of a loaded Mach-O image (C names: the leading underscore taken off). */
export interface MachOExport {
  readonly name: string;
  readonly address: bigint;
  /** In a section of instructions. */
  readonly executable: boolean;
}

/** One symbol pointer dyld fills for an imported symbol. */
export interface MachOImport {
  readonly name: string;
  /** The install name of the dylib the symbol is bound from, when its two-level ordinal names one. */
  readonly from?: string;
  readonly slot: bigint;
  readonly target: bigint;
  /** `__la_symbol_ptr` (bound on first call) or `__got` / `__nl_symbol_ptr` (bound at load). */
  readonly kind: "lazy_pointer" | "non_lazy_pointer";
}

const MH_MAGIC_64 = 0xfeedfacf;
const LC_SYMTAB = 0x2, LC_DYSYMTAB = 0xb, LC_LOAD_DYLIB = 0xc, LC_SEGMENT_64 = 0x19, LC_LOAD_WEAK_DYLIB = 0x80000018,
  LC_REEXPORT_DYLIB = 0x8000001f, LC_LAZY_LOAD_DYLIB = 0x20, LC_LOAD_UPWARD_DYLIB = 0x80000023,
  LC_DYLD_INFO = 0x22, LC_DYLD_INFO_ONLY = 0x80000022, LC_DYLD_EXPORTS_TRIE = 0x80000033;
const DYLIB_COMMANDS = new Set([LC_LOAD_DYLIB, LC_LOAD_WEAK_DYLIB, LC_REEXPORT_DYLIB, LC_LAZY_LOAD_DYLIB, LC_LOAD_UPWARD_DYLIB]);
const S_NON_LAZY_SYMBOL_POINTERS = 0x6, S_LAZY_SYMBOL_POINTERS = 0x7;
const S_ATTR_PURE_INSTRUCTIONS = 0x80000000, S_ATTR_SOME_INSTRUCTIONS = 0x400;
const INDIRECT_SYMBOL_LOCAL = 0x80000000, INDIRECT_SYMBOL_ABS = 0x40000000;
/** The export flags' low two bits: regular, thread-local or absolute. */
const KIND_THREAD_LOCAL = 1, KIND_ABSOLUTE = 2;
const EXPORT_SYMBOL_FLAGS_REEXPORT = 0x8;

interface Section {
  readonly name: string;
  readonly address: bigint;
  readonly size: bigint;
  readonly flags: number;
  /** For symbol pointer sections: their first entry's index in the indirect symbol table. */
  readonly indirectIndex: number;
}

/** What the load commands say, addresses moved by the image's slide. */
interface Layout {
  /** `__TEXT`'s size. */
  readonly text: bigint;
  readonly sections: readonly Section[];
  /** Where a `__LINKEDIT` file offset is in memory. */
  linkedit(offset: number): bigint;
  readonly exportTrie: { offset: number; size: number } | null;
  readonly symtab: { symoff: number; nsyms: number; stroff: number; strsize: number } | null;
  readonly indirect: { offset: number; count: number } | null;
  /** Install names of the dylibs loaded, in order (two-level ordinal 1 is the first). */
  readonly dylibs: readonly string[];
}

function fields(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

function fixedName(bytes: Uint8Array): string {
  const end = bytes.indexOf(0);
  return new TextDecoder().decode(end < 0 ? bytes : bytes.subarray(0, end));
}

function layoutOf(read: Reader, header: bigint): Layout {
  const head = fields(read(header, 32));
  if (head.getUint32(0, true) !== MH_MAGIC_64) {
    throw new RedefineError("INVALID_ADDRESS", `the image at ${hex(header)} has no 64-bit Mach-O header.`);
  }
  const count = head.getUint32(16, true);
  const bytes = read(header + 32n, head.getUint32(20, true));
  const commands = fields(bytes);
  const segments: { name: string; vmaddr: bigint; vmsize: bigint; fileoff: bigint }[] = [];
  const raw: (Omit<Section, "address"> & { vmaddr: bigint })[] = [];
  let exportTrie: Layout["exportTrie"] = null;
  let symtab: Layout["symtab"] = null;
  let indirect: Layout["indirect"] = null;
  const dylibs: string[] = [];
  for (let at = 0, i = 0; i < count && at + 8 <= bytes.length; i++) {
    const cmd = commands.getUint32(at, true), size = commands.getUint32(at + 4, true);
    if (size < 8) break;
    if (cmd === LC_SEGMENT_64) {
      const name = fixedName(bytes.subarray(at + 8, at + 24));
      segments.push({
        name,
        vmaddr: commands.getBigUint64(at + 24, true),
        vmsize: commands.getBigUint64(at + 32, true),
        fileoff: commands.getBigUint64(at + 40, true),
      });
      // section_64 records (80 bytes) follow the 72-byte segment command.
      for (let s = 0; s < commands.getUint32(at + 64, true); s++) {
        const section = at + 72 + 80 * s;
        raw.push({
          name: `${name},${fixedName(bytes.subarray(section, section + 16))}`,
          vmaddr: commands.getBigUint64(section + 32, true),
          size: commands.getBigUint64(section + 40, true),
          flags: commands.getUint32(section + 64, true),
          indirectIndex: commands.getUint32(section + 68, true),
        });
      }
    } else if (cmd === LC_DYLD_EXPORTS_TRIE) {
      exportTrie = { offset: commands.getUint32(at + 8, true), size: commands.getUint32(at + 12, true) };
    } else if ((cmd === LC_DYLD_INFO || cmd === LC_DYLD_INFO_ONLY) && exportTrie === null) {
      exportTrie = { offset: commands.getUint32(at + 40, true), size: commands.getUint32(at + 44, true) };
    } else if (cmd === LC_SYMTAB) {
      symtab = {
        symoff: commands.getUint32(at + 8, true),
        nsyms: commands.getUint32(at + 12, true),
        stroff: commands.getUint32(at + 16, true),
        strsize: commands.getUint32(at + 20, true),
      };
    } else if (cmd === LC_DYSYMTAB) {
      indirect = { offset: commands.getUint32(at + 56, true), count: commands.getUint32(at + 60, true) };
    } else if (DYLIB_COMMANDS.has(cmd)) {
      dylibs.push(fixedName(bytes.subarray(at + commands.getUint32(at + 8, true), at + size)));
    }
    at += size;
  }
  const text = segments.find((s) => s.name === "__TEXT");
  const linkedit = segments.find((s) => s.name === "__LINKEDIT");
  if (text === undefined) {
    throw new RedefineError("INVALID_ADDRESS", `the image at ${hex(header)} has no __TEXT segment.`);
  }
  const slide = header - text.vmaddr;
  return {
    text: text.vmsize,
    sections: raw.map(({ vmaddr, ...s }) => ({ ...s, address: vmaddr + slide })),
    // The offsets count in the file __LINKEDIT came from (the shared cache's, for its images).
    linkedit: (offset) => {
      if (linkedit === undefined) {
        throw new RedefineError("INVALID_ADDRESS", `the image at ${hex(header)} has no __LINKEDIT segment.`);
      }
      return linkedit.vmaddr + slide - linkedit.fileoff + BigInt(offset);
    },
    exportTrie: exportTrie && exportTrie.size > 0 ? exportTrie : null,
    symtab,
    indirect,
    dylibs,
  };
}

/**
 * The image's `__TEXT` segment, which starts with its header: the shared cache keeps an image's
 * other segments apart from it, among other images' segments.
 */
export function machoText(read: Reader, header: bigint): { base: bigint; size: number } {
  const { text } = layoutOf(read, header);
  return { base: header, size: Number(text) };
}

/** Reads a ULEB128 at `at`; returns the value and where the next field starts. */
function uleb(bytes: Uint8Array, at: number): [bigint, number] {
  let value = 0n, shift = 0n;
  for (;;) {
    if (at >= bytes.length) throw new RedefineError("INVALID_ADDRESS", "the export trie ends inside a number.");
    const byte = bytes[at++];
    value += BigInt(byte % 128) << shift;
    if (byte < 128) return [value, at];
    shift += 7n;
  }
}

/**
 * The symbols the export trie of the image at `header` names: regular and absolute ones, with the
 * address dyld binds (an exported stub with a resolver: the stub). Re-exports of other dylibs'
 * symbols and thread-local variables are left out.
 */
export function machoExports(read: Reader, header: bigint): MachOExport[] {
  const layout = layoutOf(read, header);
  if (layout.exportTrie === null) return [];
  const trie = read(layout.linkedit(layout.exportTrie.offset), layout.exportTrie.size);
  const found: MachOExport[] = [];
  const visited = new Set<number>();
  const walk = (node: number, prefix: string) => {
    // A node reached twice is a malformed trie, which must not spin.
    if (visited.has(node) || node >= trie.length) return;
    visited.add(node);
    let [terminal, at] = uleb(trie, node);
    const children = at + Number(terminal);
    if (terminal > 0n) {
      let flags: bigint, offset: bigint;
      [flags, at] = uleb(trie, at);
      const kind = Number(flags % 4n);
      if (!(Number(flags) & EXPORT_SYMBOL_FLAGS_REEXPORT) && kind !== KIND_THREAD_LOCAL) {
        // The address (for a stub with a resolver, the stub's, which is what callers bind to).
        [offset, at] = uleb(trie, at);
        const address = kind === KIND_ABSOLUTE ? offset : header + offset;
        const section = layout.sections.find((s) => address >= s.address && address < s.address + s.size);
        const executable = section !== undefined &&
          (section.flags & (S_ATTR_PURE_INSTRUCTIONS | S_ATTR_SOME_INSTRUCTIONS)) !== 0;
        found.push({ name: prefix.startsWith("_") ? prefix.slice(1) : prefix, address, executable });
      }
    }
    if (children >= trie.length) return;
    let next = children + 1;
    for (let i = 0; i < trie[children]; i++) {
      const end = trie.indexOf(0, next);
      if (end < 0) return;
      const edge = new TextDecoder().decode(trie.subarray(next, end));
      const [child, after] = uleb(trie, end + 1);
      next = after;
      walk(Number(child), prefix + edge);
    }
  };
  walk(0, "");
  return found;
}

/**
 * The lazy and non-lazy symbol pointers of the image at `header` (`__la_symbol_ptr`, `__got`,
 * `__nl_symbol_ptr`), each named through the indirect symbol table, with what it holds now.
 */
export function machoImports(read: Reader, header: bigint): MachOImport[] {
  const layout = layoutOf(read, header);
  const { symtab, indirect } = layout;
  if (symtab === null || indirect === null || indirect.count === 0) return [];
  const table = fields(read(layout.linkedit(indirect.offset), 4 * indirect.count));
  const symbols = fields(read(layout.linkedit(symtab.symoff), 16 * symtab.nsyms));
  const strings = read(layout.linkedit(symtab.stroff), symtab.strsize);
  const imports: MachOImport[] = [];
  for (const section of layout.sections) {
    const type = section.flags % 256;
    if (type !== S_LAZY_SYMBOL_POINTERS && type !== S_NON_LAZY_SYMBOL_POINTERS) continue;
    for (let i = 0; i < Number(section.size / 8n); i++) {
      const index = section.indirectIndex + i;
      if (index >= indirect.count) break;
      const symbol = table.getUint32(4 * index, true);
      if (symbol & (INDIRECT_SYMBOL_LOCAL | INDIRECT_SYMBOL_ABS) || symbol >= symtab.nsyms) continue;
      // nlist_64: n_strx u32, n_type u8, n_sect u8, n_desc u16, n_value u64
      const nameAt = symbols.getUint32(16 * symbol, true);
      const name = fixedName(strings.subarray(nameAt));
      const ordinal = Math.floor(symbols.getUint16(16 * symbol + 6, true) / 256); // GET_LIBRARY_ORDINAL
      const from = ordinal >= 1 && ordinal <= layout.dylibs.length ? layout.dylibs[ordinal - 1] : undefined;
      const slot = section.address + 8n * BigInt(i);
      imports.push({
        name: name.startsWith("_") ? name.slice(1) : name,
        ...(from === undefined ? {} : { from }),
        slot,
        target: fields(read(slot, 8)).getBigUint64(0, true),
        kind: type === S_LAZY_SYMBOL_POINTERS ? "lazy_pointer" : "non_lazy_pointer",
      });
    }
  }
  return imports;
}
