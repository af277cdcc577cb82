/**
 * Reading ELF64 images as the dynamic loader left them in memory: the span of their `PT_LOAD`
 * segments, their dynamic section, the dynamic symbol table (sized by DT_GNU_HASH or DT_HASH, with
 * symbol versions), and the import slots their `JUMP_SLOT` / `GLOB_DAT` relocations filled. Pure
 * functions over a `read(address, length)` that the caller checks against the memory map, so the
 * same code reads a live library and a test image built in memory.
 */

/** Copies `length` bytes at `address`; throws when they are not readable memory. */
export type Reader = (address: bigint, length: number) => Uint8Array;

/** The CPUs whose relocation numbers we know. */
export type ElfMachine = "x86_64" | "aarch64";

/** One program header, as linked (add the load bias for an address). */
export interface ProgramHeader {
  readonly type: number;
  readonly flags: number;
  readonly vaddr: bigint;
  readonly memsz: bigint;
}

/** A module's place in memory: `bias` is what the loader added to every linked address. */
export interface LoadedImage {
  readonly bias: bigint;
  readonly headers: readonly ProgramHeader[];
}

/** What the dynamic section says, every address already relocated. */
export interface DynamicInfo {
  readonly symtab: bigint;
  readonly strtab: bigint;
  readonly strsz: number;
  /** Symbols in the table, from DT_GNU_HASH or DT_HASH; 0 without either. */
  readonly symbolCount: number;
  readonly versym: bigint;
  readonly verdef: bigint;
  readonly verdefnum: number;
  readonly verneed: bigint;
  readonly verneednum: number;
  readonly jmprel: bigint;
  readonly pltrelsz: number;
  readonly rela: bigint;
  readonly relasz: number;
  readonly relaent: number;
  /** DT_SONAME, "" when there is none. */
  readonly soname: string;
}

/** One entry of the dynamic symbol table. */
export interface DynamicSymbol {
  readonly index: number;
  readonly name: string;
  /** STT_* */
  readonly type: number;
  /** STB_* */
  readonly binding: number;
  readonly defined: boolean;
  /** SHN_ABS: `value` is a number, not an address. */
  readonly absolute: boolean;
  /** The value as linked. */
  readonly value: bigint;
  /** The relocated address for a symbol with one; the raw value otherwise. */
  readonly address: bigint;
  readonly size: number;
  /** The version name, when the symbol has one. */
  readonly version?: string;
  /** False for a non-default version (`name@V`, not `name@@V`): only a versioned reference binds it. */
  readonly default: boolean;
}

/** An exported symbol of a loaded module. */
export interface ElfExport {
  readonly name: string;
  readonly address: bigint;
  readonly size: number;
  readonly kind: "function" | "data";
  /** STT_GNU_IFUNC: `address` is the resolver, which picks the implementation at load time. */
  readonly indirect: boolean;
  readonly version?: string;
  readonly default: boolean;
}

/** One slot the loader filled with the address of an imported symbol. */
export interface ElfImport {
  readonly name: string;
  /** The slot's address (8 bytes, aligned). */
  readonly slot: bigint;
  /** What the slot holds now. */
  readonly target: bigint;
  readonly kind: "jump_slot" | "glob_dat";
  /** The version the reference asks for, when it asks for one. */
  readonly version?: string;
}

const PHDR_SIZE = 56;
const SYM_SIZE = 24;
const DYN_SIZE = 16;
const RELA_SIZE = 24;

const PT_LOAD = 1;
const PT_DYNAMIC = 2;

const DT_NULL = 0, DT_PLTRELSZ = 2, DT_HASH = 4, DT_STRTAB = 5, DT_SYMTAB = 6, DT_RELA = 7,
  DT_RELASZ = 8, DT_RELAENT = 9, DT_STRSZ = 10, DT_SONAME = 14, DT_JMPREL = 23;
const DT_GNU_HASH = 0x6ffffef5, DT_VERSYM = 0x6ffffff0, DT_VERDEF = 0x6ffffffc,
  DT_VERDEFNUM = 0x6ffffffd, DT_VERNEED = 0x6ffffffe, DT_VERNEEDNUM = 0x6fffffff;

/** Tags whose value is an address (the others are sizes, counts or string offsets). */
const ADDRESS_TAGS = new Set([DT_HASH, DT_STRTAB, DT_SYMTAB, DT_RELA, DT_JMPREL, DT_GNU_HASH, DT_VERSYM,
  DT_VERDEF, DT_VERNEED]);

const STT_FUNC = 2, STT_TLS = 6, STT_GNU_IFUNC = 10;
const STB_LOCAL = 0;
const SHN_UNDEF = 0, SHN_ABS = 0xfff1;
const VERSYM_HIDDEN = 0x8000;
const VER_FLG_BASE = 1;

const RELOCATIONS: Record<ElfMachine, { jumpSlot: number; globDat: number }> = {
  x86_64: { jumpSlot: 7, globDat: 6 }, // R_X86_64_JUMP_SLOT, R_X86_64_GLOB_DAT
  aarch64: { jumpSlot: 1026, globDat: 1025 }, // R_AARCH64_JUMP_SLOT, R_AARCH64_GLOB_DAT
};

function fields(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** The `count` program headers at `address`. */
export function programHeaders(read: Reader, address: bigint, count: number): ProgramHeader[] {
  const table = fields(read(address, count * PHDR_SIZE));
  return Array.from({ length: count }, (_, i) => ({
    type: table.getUint32(i * PHDR_SIZE, true),
    flags: table.getUint32(i * PHDR_SIZE + 4, true),
    vaddr: table.getBigUint64(i * PHDR_SIZE + 16, true),
    memsz: table.getBigUint64(i * PHDR_SIZE + 40, true),
  }));
}

/** The linked range `[low, high)` the `PT_LOAD` segments cover; null without any. */
function linkedRange(headers: readonly ProgramHeader[]): { low: bigint; high: bigint } | null {
  const loads = headers.filter((h) => h.type === PT_LOAD);
  if (loads.length === 0) return null;
  let low = loads[0]!.vaddr, high = loads[0]!.vaddr + loads[0]!.memsz;
  for (const h of loads) {
    if (h.vaddr < low) low = h.vaddr;
    if (h.vaddr + h.memsz > high) high = h.vaddr + h.memsz;
  }
  return { low, high };
}

/** Where the image lies in memory, whole pages; null when it has no `PT_LOAD` segment. */
export function loadedSpan(image: LoadedImage, pageSize: number): { base: bigint; size: number } | null {
  const range = linkedRange(image.headers);
  if (range === null) return null;
  const page = BigInt(pageSize);
  const start = image.bias + range.low;
  const base = start - start % page;
  const end = image.bias + range.high;
  return { base, size: Number(end + (page - end % page) % page - base) };
}

/**
 * The image whose ELF header the loader mapped at `base` (`dladdr`'s `dli_fbase`): its program
 * headers, read where the header says they are in the file (inside the first segment, which maps
 * the file from offset 0), and its bias, `base` less the first segment's linked page.
 */
export function imageAt(read: Reader, base: bigint, pageSize: number): LoadedImage {
  const header = fields(read(base, 64));
  const headers = programHeaders(read, base + header.getBigUint64(32, true), header.getUint16(56, true));
  const low = linkedRange(headers)?.low ?? 0n;
  return { bias: base - (low - low % BigInt(pageSize)), headers };
}

const PT_GNU_PROPERTY = 0x6474e553;
const NT_GNU_PROPERTY_TYPE_0 = 5;
const GNU_PROPERTY_AARCH64_FEATURE_1_AND = 0xc0000000;

/**
 * The AArch64 features the image was built for, from its `PT_GNU_PROPERTY` note (what the kernel
 * and glibc's loader read): bit 0 BTI (its text is mapped PROT_BTI on a CPU with BTI), bit 1 PAC,
 * bit 2 GCS; 0 without the note. ELF64 property notes pad to 8 bytes.
 */
export function aarch64Features(read: Reader, image: LoadedImage): number {
  const header = image.headers.find((h) => h.type === PT_GNU_PROPERTY);
  if (header === undefined) return 0;
  const notes = fields(read(image.bias + header.vaddr, Number(header.memsz)));
  const pad = (n: number) => Math.ceil(n / 8) * 8;
  for (let at = 0; at + 12 <= notes.byteLength;) {
    const nameSize = notes.getUint32(at, true), descSize = notes.getUint32(at + 4, true);
    const type = notes.getUint32(at + 8, true);
    const desc = at + 12 + Math.ceil(nameSize / 4) * 4;
    const end = Math.min(desc + descSize, notes.byteLength);
    // The name is "GNU\0": 0x00554e47 little-endian.
    if (type === NT_GNU_PROPERTY_TYPE_0 && nameSize === 4 && at + 16 <= notes.byteLength && notes.getUint32(at + 12, true) === 0x00554e47) {
      for (let p = pad(desc); p + 8 <= end;) {
        const kind = notes.getUint32(p, true), size = notes.getUint32(p + 4, true);
        if (kind === GNU_PROPERTY_AARCH64_FEATURE_1_AND && size >= 4 && p + 12 <= end) return notes.getUint32(p + 8, true);
        p += 8 + pad(size);
      }
    }
    at = pad(desc + descSize);
  }
  return 0;
}

/**
 * A dynamic-section address, relocated. glibc adds the bias in place to some tags only (not the
 * version tables) and to none where the section is read-only (the vDSO): a value inside the
 * linked range is taken as linked, anything else as already relocated.
 */
function relocator(image: LoadedImage): (value: bigint) => bigint {
  const range = linkedRange(image.headers);
  return (value) => {
    if (image.bias === 0n || range === null) return value;
    const loadedLow = image.bias + range.low, loadedHigh = image.bias + range.high;
    if (value >= loadedLow && value < loadedHigh) return value;
    return value >= range.low && value < range.high ? value + image.bias : value;
  };
}

/** The dynamic section of a loaded image; null when it has none (a static executable). */
export function dynamicInfo(read: Reader, image: LoadedImage): DynamicInfo | null {
  const header = image.headers.find((h) => h.type === PT_DYNAMIC);
  if (header === undefined) return null;
  const relocate = relocator(image);
  const count = Number(header.memsz) / DYN_SIZE;
  const table = fields(read(image.bias + header.vaddr, count * DYN_SIZE));
  const tags = new Map<number, bigint>();
  for (let i = 0; i < count; i++) {
    const tag = Number(table.getBigInt64(i * DYN_SIZE, true));
    if (tag === DT_NULL) break;
    const value = table.getBigUint64(i * DYN_SIZE + 8, true);
    if (!tags.has(tag)) tags.set(tag, ADDRESS_TAGS.has(tag) ? relocate(value) : value);
  }
  const address = (tag: number) => tags.get(tag) ?? 0n;
  const number = (tag: number) => Number(tags.get(tag) ?? 0n);
  const strtab = address(DT_STRTAB);
  const strsz = number(DT_STRSZ);
  const strings = strtab !== 0n && strsz > 0 ? read(strtab, strsz) : new Uint8Array(0);
  const symbolCount = tags.has(DT_GNU_HASH)
    ? gnuHashCount(read, address(DT_GNU_HASH))
    : tags.has(DT_HASH)
    ? fields(read(address(DT_HASH) + 4n, 4)).getUint32(0, true)
    : 0;
  return {
    symtab: address(DT_SYMTAB),
    strtab,
    strsz,
    symbolCount,
    versym: address(DT_VERSYM),
    verdef: address(DT_VERDEF),
    verdefnum: number(DT_VERDEFNUM),
    verneed: address(DT_VERNEED),
    verneednum: number(DT_VERNEEDNUM),
    jmprel: address(DT_JMPREL),
    pltrelsz: number(DT_PLTRELSZ),
    rela: address(DT_RELA),
    relasz: number(DT_RELASZ),
    relaent: number(DT_RELAENT) || RELA_SIZE,
    soname: tags.has(DT_SONAME) ? stringAt(strings, number(DT_SONAME)) : "",
  };
}

/**
 * The number of symbols a DT_GNU_HASH table covers: one past the last symbol of the chain that
 * starts at the highest bucket (the table does not store the count).
 */
function gnuHashCount(read: Reader, address: bigint): number {
  const header = fields(read(address, 16));
  const nbuckets = header.getUint32(0, true);
  const symoffset = header.getUint32(4, true);
  const bloomSize = header.getUint32(8, true);
  const bucketsAt = address + 16n + BigInt(bloomSize) * 8n;
  const buckets = fields(read(bucketsAt, nbuckets * 4));
  let last = 0;
  for (let i = 0; i < nbuckets; i++) last = Math.max(last, buckets.getUint32(i * 4, true));
  if (last < symoffset) return symoffset;
  const chainAt = bucketsAt + BigInt(nbuckets) * 4n;
  for (let index = last; ; index++) {
    const value = fields(read(chainAt + BigInt(index - symoffset) * 4n, 4)).getUint32(0, true);
    // The low bit marks the end of a chain.
    if (value % 2 === 1) return index + 1;
  }
}

function stringAt(strings: Uint8Array, offset: number): string {
  if (offset >= strings.length) return "";
  const end = strings.indexOf(0, offset);
  return new TextDecoder().decode(strings.subarray(offset, end < 0 ? strings.length : end));
}

/** Version index → name, from DT_VERDEF (what the image defines) and DT_VERNEED (what it needs). */
function versionNames(read: Reader, info: DynamicInfo, strings: Uint8Array): Map<number, string> {
  const names = new Map<number, string>();
  let at = info.verdef;
  for (let i = 0; i < info.verdefnum && at !== 0n; i++) {
    // Elf64_Verdef: version u16, flags u16, ndx u16, cnt u16, hash u32, aux u32, next u32
    const verdef = fields(read(at, 20));
    const flags = verdef.getUint16(2, true);
    const index = verdef.getUint16(4, true);
    const aux = verdef.getUint32(12, true);
    // Elf64_Verdaux: name u32, next u32 — the first one names the version.
    const name = fields(read(at + BigInt(aux), 8)).getUint32(0, true);
    if (!(flags & VER_FLG_BASE)) names.set(index, stringAt(strings, name));
    const next = verdef.getUint32(16, true);
    if (next === 0) break;
    at += BigInt(next);
  }
  at = info.verneed;
  for (let i = 0; i < info.verneednum && at !== 0n; i++) {
    // Elf64_Verneed: version u16, cnt u16, file u32, aux u32, next u32
    const verneed = fields(read(at, 16));
    const count = verneed.getUint16(2, true);
    let auxAt = at + BigInt(verneed.getUint32(8, true));
    for (let j = 0; j < count; j++) {
      // Elf64_Vernaux: hash u32, flags u16, other u16, name u32, next u32
      const vernaux = fields(read(auxAt, 16));
      names.set(vernaux.getUint16(6, true), stringAt(strings, vernaux.getUint32(8, true)));
      const next = vernaux.getUint32(12, true);
      if (next === 0) break;
      auxAt += BigInt(next);
    }
    const next = verneed.getUint32(12, true);
    if (next === 0) break;
    at += BigInt(next);
  }
  return names;
}

/** Every entry of the dynamic symbol table but the null one at index 0. */
export function dynamicSymbols(read: Reader, image: LoadedImage, info: DynamicInfo): DynamicSymbol[] {
  if (info.symtab === 0n || info.symbolCount <= 1) return [];
  const strings = read(info.strtab, info.strsz);
  const table = fields(read(info.symtab, info.symbolCount * SYM_SIZE));
  const versym = info.versym === 0n ? null : fields(read(info.versym, info.symbolCount * 2));
  const versions = versym === null ? new Map<number, string>() : versionNames(read, info, strings);
  const symbols: DynamicSymbol[] = [];
  for (let index = 1; index < info.symbolCount; index++) {
    // Elf64_Sym: name u32, info u8, other u8, shndx u16, value u64, size u64
    const at = index * SYM_SIZE;
    const symbolInfo = table.getUint8(at + 4);
    const section = table.getUint16(at + 6, true);
    const value = table.getBigUint64(at + 8, true);
    const defined = section !== SHN_UNDEF;
    const absolute = section === SHN_ABS;
    const versionWord = versym === null ? 1 : versym.getUint16(index * 2, true);
    const version = versions.get(versionWord % VERSYM_HIDDEN);
    symbols.push({
      index,
      name: stringAt(strings, table.getUint32(at, true)),
      type: symbolInfo % 16,
      binding: Math.floor(symbolInfo / 16),
      defined,
      absolute,
      value,
      // An undefined symbol with a value is an executable's PLT entry standing for the function.
      address: !absolute && (defined || value !== 0n) ? image.bias + value : value,
      size: Number(table.getBigUint64(at + 16, true)),
      ...(version === undefined ? {} : { version }),
      default: versionWord < VERSYM_HIDDEN,
    });
  }
  return symbols;
}

/**
 * The symbols an image defines for others: global and weak, functions and data. Thread-local
 * variables (no one address) and the absolute symbols that only name a version are left out. An
 * executable's undefined function symbol with a value counts: it is the PLT entry the executable
 * made the function's canonical address, and the default lookup (`dlsym(RTLD_DEFAULT)`) finds it
 * before the library that defines the function.
 */
export function exportedSymbols(read: Reader, image: LoadedImage, info: DynamicInfo): ElfExport[] {
  return dynamicSymbols(read, image, info)
    .filter((s) => (s.defined || s.value !== 0n) && s.binding !== STB_LOCAL && s.type !== STT_TLS && s.name !== "")
    .filter((s) => !(s.absolute && s.name === s.version))
    .map((s) => ({
      name: s.name,
      address: s.address,
      size: s.size,
      kind: s.type === STT_FUNC || s.type === STT_GNU_IFUNC ? "function" as const : "data" as const,
      indirect: s.type === STT_GNU_IFUNC,
      ...(s.version === undefined ? {} : { version: s.version }),
      default: s.default,
    }));
}

/**
 * The slots the loader fills with an imported symbol's address: `JUMP_SLOT` relocations of
 * DT_JMPREL and `GLOB_DAT` ones of DT_RELA (where some linkers let DT_RELA's range take in
 * DT_JMPREL's: each relocation counts once), with what each slot holds now.
 */
export function importSlots(read: Reader, image: LoadedImage, info: DynamicInfo, machine: ElfMachine): ElfImport[] {
  const symbols = dynamicSymbols(read, image, info);
  const { jumpSlot, globDat } = RELOCATIONS[machine];
  const imports: ElfImport[] = [];
  const seen = new Set<bigint>();
  const table = (start: bigint, size: number, entry: number) => {
    if (start === 0n || size === 0) return;
    const bytes = fields(read(start, size));
    for (let at = 0; at + RELA_SIZE <= size; at += entry) {
      const where = start + BigInt(at);
      if (seen.has(where)) continue;
      seen.add(where);
      // Elf64_Rela: offset u64, info u64 (type in the low half, symbol index in the high), addend i64
      const type = bytes.getUint32(at + 8, true);
      const symbol = bytes.getUint32(at + 12, true);
      if ((type !== jumpSlot && type !== globDat) || symbol === 0 || symbol > symbols.length) continue;
      const slot = image.bias + bytes.getBigUint64(at, true);
      const s = symbols[symbol - 1]!;
      imports.push({
        name: s.name,
        slot,
        target: fields(read(slot, 8)).getBigUint64(0, true),
        kind: type === jumpSlot ? "jump_slot" : "glob_dat",
        ...(s.version === undefined ? {} : { version: s.version }),
      });
    }
  };
  table(info.jmprel, info.pltrelsz, RELA_SIZE);
  table(info.rela, info.relasz, info.relaent);
  return imports;
}
