/**
 * Windows DLLs written in memory. The stub library of platform/image/elf.ts as a DLL: the ELF
 * image's code and slots keep their places relative to each other (everything moves up by one
 * page, the headers' room), so the position-independent stubs work unchanged and
 * `src/original.ts`, which only adds the ELF offsets to the address of the first stub minus its
 * offset, finds every slot where the DLL put it. The header and export writers are shared with
 * the tests' DLL that imports through its import address table (test/import_dll.ts).
 */

const SHIFT = 0x1000; // the DLL's headers take the first page; the ELF image starts right after
/** Where sections start in memory: whole pages. */
export const SECTION_ALIGNMENT = 0x1000;
const FILE_ALIGNMENT = 0x200;
const PT_LOAD = 1, PT_DYNAMIC = 2;
const PF_X = 1;
const DT_NULL = 0, DT_HASH = 4, DT_STRTAB = 5, DT_SYMTAB = 6;
const IMAGE_FILE_MACHINE_AMD64 = 0x8664;
/** Section flags: code, execute, read. */
export const IMAGE_SCN_CODE_EXECUTE_READ = 0x60000020;
/** Section flags: initialised data, read, write. */
export const IMAGE_SCN_DATA_READ_WRITE = 0xc0000040;
const IMAGE_SCN_DATA_READ = 0x40000040;

/** What the DLL is made of: the ELF image's loadable pieces and exported functions. */
interface StubElf {
  readonly code: { vaddr: number; bytes: Uint8Array };
  readonly data: { vaddr: number; bytes: Uint8Array };
  readonly exports: { name: string; vaddr: number }[];
}

/** `n` rounded up to a multiple of `to`. */
export function align(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

/** Reads the pieces of an ELF64 stub image made by `buildStubImage`. */
function readStubElf(elf: Uint8Array): StubElf {
  const v = new DataView(elf.buffer, elf.byteOffset, elf.byteLength);
  if (v.getUint32(0, false) !== 0x7f454c46 || elf[4] !== 2) throw new Error("not an ELF64 image");
  const phoff = Number(v.getBigUint64(32, true)), phnum = v.getUint16(56, true);
  const loads: { vaddr: number; bytes: Uint8Array; exec: boolean }[] = [];
  let dynamic = -1;
  for (let i = 0; i < phnum; i++) {
    const p = phoff + 56 * i;
    const offset = Number(v.getBigUint64(p + 8, true)), vaddr = Number(v.getBigUint64(p + 16, true));
    const size = Number(v.getBigUint64(p + 32, true));
    if (v.getUint32(p, true) === PT_LOAD) {
      loads.push({ vaddr, bytes: elf.subarray(offset, offset + size), exec: (v.getUint32(p + 4, true) & PF_X) !== 0 });
    }
    if (v.getUint32(p, true) === PT_DYNAMIC) dynamic = offset;
  }
  const code = loads.find((l) => l.exec), data = loads.find((l) => !l.exec);
  if (!code || !data || dynamic < 0) throw new Error("the stub image needs a code and a data segment and PT_DYNAMIC");
  const tags = new Map<number, number>();
  for (let d = dynamic; ; d += 16) {
    const tag = Number(v.getBigUint64(d, true));
    if (tag === DT_NULL) break;
    tags.set(tag, Number(v.getBigUint64(d + 8, true)));
  }
  // Segments sit at their own file offsets in these images, so addresses are file offsets.
  const symtab = tags.get(DT_SYMTAB)!, strtab = tags.get(DT_STRTAB)!;
  const count = v.getUint32(tags.get(DT_HASH)! + 4, true); // nchain: the number of symbols
  const exports: { name: string; vaddr: number }[] = [];
  for (let s = 1; s < count; s++) {
    const sym = symtab + 24 * s;
    const nameAt = strtab + v.getUint32(sym, true);
    const name = new TextDecoder().decode(elf.subarray(nameAt, elf.indexOf(0, nameAt)));
    exports.push({ name, vaddr: Number(v.getBigUint64(sym + 8, true)) });
  }
  return { code, data, exports };
}

/** A section of a DLL being written: its place in memory, its bytes, and what it may be used for. */
export interface Section {
  readonly name: string;
  readonly rva: number;
  readonly bytes: Uint8Array;
  /** The memory it spans once loaded (the bytes, then zeros). */
  readonly virtualSize: number;
  readonly flags: number;
}

/** Data directory indices. */
const EXPORT = 0, BASE_RELOCATIONS = 5;
const encoder = new TextEncoder();

/**
 * `.edata` at `rva`: the export directory naming `dllName`, its three tables and the names, each
 * export by name at its RVA; then an empty base relocation block (the code is position
 * independent) so that the loader may place the DLL anywhere. `codeRva` is the page the block is for.
 */
export function exportSection(
  rva: number,
  dllName: string,
  exports: readonly { name: string; rva: number }[],
  codeRva: number,
): { section: Section; directories: [number, number, number][] } {
  const sorted = [...exports].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  const functionsAt = 40, namesAt = functionsAt + 4 * exports.length, ordinalsAt = namesAt + 4 * exports.length;
  let stringsAt = ordinalsAt + 2 * exports.length;
  const strings: { at: number; bytes: Uint8Array }[] = [];
  const string = (text: string) => {
    const entry = { at: stringsAt, bytes: encoder.encode(text + "\0") };
    strings.push(entry);
    stringsAt += entry.bytes.length;
    return entry.at;
  };
  const dllNameAt = string(dllName);
  const nameAt = sorted.map((e) => string(e.name));
  const exportSize = stringsAt;
  const relocAt = align(exportSize, 4);
  const bytes = new Uint8Array(relocAt + 8);
  const e = new DataView(bytes.buffer);
  e.setUint32(12, rva + dllNameAt, true);
  e.setUint32(16, 1, true); // ordinal base
  e.setUint32(20, exports.length, true);
  e.setUint32(24, exports.length, true);
  e.setUint32(28, rva + functionsAt, true);
  e.setUint32(32, rva + namesAt, true);
  e.setUint32(36, rva + ordinalsAt, true);
  sorted.forEach((entry, i) => {
    e.setUint32(functionsAt + 4 * i, entry.rva, true);
    e.setUint32(namesAt + 4 * i, rva + nameAt[i], true);
    e.setUint16(ordinalsAt + 2 * i, i, true);
  });
  for (const s of strings) bytes.set(s.bytes, s.at);
  e.setUint32(relocAt, codeRva, true); // a base relocation block with no entries
  e.setUint32(relocAt + 4, 8, true);
  const section: Section = { name: ".edata", rva, bytes, virtualSize: bytes.length, flags: IMAGE_SCN_DATA_READ };
  return {
    section,
    directories: [[EXPORT, rva, exportSize], [BASE_RELOCATIONS, rva + relocAt, 8]],
  };
}

/**
 * A PE32+ DLL (x86-64) of `sections` (in address order, the first the code) with the data
 * directories given as [index, rva, size].
 */
export function writeDll(sections: readonly Section[], directories: readonly [number, number, number][]): Uint8Array {
  const peAt = 0x40, coffAt = peAt + 4, optionalAt = coffAt + 20, optionalSize = 240;
  const sectionTableAt = optionalAt + optionalSize;
  const headersSize = align(sectionTableAt + 40 * sections.length, FILE_ALIGNMENT);
  let fileAt = headersSize;
  const placed = sections.map((s) => {
    const raw = align(s.bytes.length, FILE_ALIGNMENT);
    const entry = { ...s, fileAt, raw };
    fileAt += raw;
    return entry;
  });
  const last = sections[sections.length - 1];
  const imageSize = align(last.rva + last.virtualSize, SECTION_ALIGNMENT);
  const out = new Uint8Array(fileAt);
  const v = new DataView(out.buffer);

  out.set([0x4d, 0x5a], 0); // "MZ"
  v.setUint32(0x3c, peAt, true);
  out.set([0x50, 0x45, 0, 0], peAt); // "PE\0\0"
  v.setUint16(coffAt, IMAGE_FILE_MACHINE_AMD64, true);
  v.setUint16(coffAt + 2, sections.length, true);
  v.setUint16(coffAt + 16, optionalSize, true);
  v.setUint16(coffAt + 18, 0x2022, true); // EXECUTABLE_IMAGE | LARGE_ADDRESS_AWARE | DLL

  const o = optionalAt;
  v.setUint16(o, 0x20b, true); // PE32+
  v.setUint32(o + 4, placed[0].raw, true); // SizeOfCode
  v.setUint32(o + 8, placed.slice(1).reduce((n, s) => n + s.raw, 0), true); // SizeOfInitializedData
  v.setUint32(o + 16, 0, true); // no entry point: no DllMain
  v.setUint32(o + 20, sections[0].rva, true); // BaseOfCode
  v.setBigUint64(o + 24, 0x1_8000_0000n, true); // ImageBase (any: the loader relocates freely)
  v.setUint32(o + 32, SECTION_ALIGNMENT, true);
  v.setUint32(o + 36, FILE_ALIGNMENT, true);
  v.setUint16(o + 40, 6, true); // MajorOperatingSystemVersion
  v.setUint16(o + 48, 6, true); // MajorSubsystemVersion
  v.setUint32(o + 56, imageSize, true);
  v.setUint32(o + 60, headersSize, true);
  v.setUint16(o + 68, 3, true); // IMAGE_SUBSYSTEM_WINDOWS_CUI
  v.setUint16(o + 70, 0x0160, true); // HIGH_ENTROPY_VA | DYNAMIC_BASE | NX_COMPAT
  v.setBigUint64(o + 72, 0x100000n, true); // stack reserve
  v.setBigUint64(o + 80, 0x1000n, true); // stack commit
  v.setBigUint64(o + 88, 0x100000n, true); // heap reserve
  v.setBigUint64(o + 96, 0x1000n, true); // heap commit
  v.setUint32(o + 108, 16, true); // NumberOfRvaAndSizes
  for (const [index, rva, size] of directories) {
    v.setUint32(o + 112 + 8 * index, rva, true);
    v.setUint32(o + 116 + 8 * index, size, true);
  }

  placed.forEach((s, i) => {
    const h = sectionTableAt + 40 * i;
    out.set(encoder.encode(s.name), h);
    v.setUint32(h + 8, s.virtualSize, true);
    v.setUint32(h + 12, s.rva, true);
    v.setUint32(h + 16, s.raw, true);
    v.setUint32(h + 20, s.fileAt, true);
    v.setUint32(h + 36, s.flags, true);
    out.set(s.bytes, s.fileAt);
  });
  return out;
}

/**
 * A PE32+ DLL (x86-64) holding the code and data of the ELF stub image `elf`, each at its ELF
 * address plus 0x1000, exporting its functions by name; `dllName` is the export directory's name.
 */
export function peFromStubElf(elf: Uint8Array, dllName: string): Uint8Array {
  const { code, data, exports } = readStubElf(elf);
  const codeRva = SHIFT + code.vaddr, dataRva = SHIFT + data.vaddr;
  if (codeRva % SECTION_ALIGNMENT || dataRva % SECTION_ALIGNMENT) throw new Error("stub image segments are not page aligned");
  const edataRva = align(dataRva + data.bytes.length, SECTION_ALIGNMENT);
  const edata = exportSection(edataRva, dllName, exports.map((e) => ({ name: e.name, rva: SHIFT + e.vaddr })), codeRva);
  // The code section runs up to the data (zeros after the stubs): an image with no holes between
  // its sections, which loaders map most plainly.
  return writeDll([
    { name: ".text", rva: codeRva, bytes: code.bytes, virtualSize: dataRva - codeRva, flags: IMAGE_SCN_CODE_EXECUTE_READ },
    { name: ".data", rva: dataRva, bytes: data.bytes, virtualSize: edataRva - dataRva, flags: IMAGE_SCN_DATA_READ_WRITE },
    edata.section,
  ], edata.directories);
}
