/**
 * A shared library built in memory whose `PT_GNU_PROPERTY` note says it was built for arm64 Branch
 * Target Identification, as every library of a distribution built with
 * `-mbranch-protection=standard` is: on a CPU with BTI, the real dynamic loader maps its text
 * PROT_BTI. It exports one function, `<prefix>fn`, of the given code. Its note is `propertyNote`'s,
 * which test/bti.test.ts also builds images of its own with.
 */
import { writeElfHeaders, writeSysvHash } from "../platform/image/elf.ts";

const PAGE = 0x10000; // the largest page size in use
const EHDR = 64, PHDR = 56, SYM = 24;
const PT_LOAD = 1, PT_DYNAMIC = 2, PT_GNU_STACK = 0x6474e551, PT_GNU_PROPERTY = 0x6474e553;
const PF_X = 1, PF_W = 2, PF_R = 4;
const DT_NULL = 0, DT_HASH = 4, DT_STRTAB = 5, DT_SYMTAB = 6, DT_STRSZ = 10, DT_SYMENT = 11, DT_SONAME = 14;
const NT_GNU_PROPERTY_TYPE_0 = 5;
const GNU_PROPERTY_AARCH64_FEATURE_1_AND = 0xc0000000, FEATURE_1_BTI = 1;

/**
 * A GNU property note (`NT_GNU_PROPERTY_TYPE_0`, what a `PT_GNU_PROPERTY` segment holds) with one
 * 4-byte property for each `[type, value]`, in order: 16 bytes of header, 16 a property.
 */
export function propertyNote(properties: readonly (readonly [type: number, value: number])[]): Uint8Array {
  const note = new Uint8Array(16 + 16 * properties.length);
  const v = new DataView(note.buffer);
  v.setUint32(0, 4, true); //                               namesz
  v.setUint32(4, 16 * properties.length, true); //          descsz
  v.setUint32(8, NT_GNU_PROPERTY_TYPE_0, true); //          type
  note.set([0x47, 0x4e, 0x55, 0], 12); //                   "GNU"
  properties.forEach(([type, value], i) => {
    v.setUint32(16 + 16 * i, type, true); //                pr_type
    v.setUint32(16 + 16 * i + 4, 4, true); //               pr_datasz
    v.setUint32(16 + 16 * i + 8, value, true); //           the value (padded to 8)
  });
  return note;
}

/** The image's bytes and its one function's name. */
export function buildBtiLibrary(prefix: string, code: readonly number[]): { bytes: Uint8Array; name: string } {
  const name = `${prefix}fn`;
  const soname = `${prefix}bti.so`;
  const strtab = new TextEncoder().encode(`\0${soname}\0${name}\0`);
  const phnum = 5;
  const note = propertyNote([[GNU_PROPERTY_AARCH64_FEATURE_1_AND, FEATURE_1_BTI]]);
  const noteAt = EHDR + PHDR * phnum;
  const noteSize = note.length;
  const hashAt = noteAt + noteSize;
  const symAt = Math.ceil((hashAt + 4 * (2 + 1 + 2)) / 8) * 8;
  const strAt = symAt + SYM * 2;
  const textAt = Math.ceil((strAt + strtab.length) / 16) * 16;
  const textEnd = textAt + code.length;
  const dataAt = PAGE;
  const dynamic: [number, number][] = [
    [DT_HASH, hashAt], [DT_STRTAB, strAt], [DT_SYMTAB, symAt], [DT_STRSZ, strtab.length],
    [DT_SYMENT, SYM], [DT_SONAME, 1], [DT_NULL, 0],
  ];
  const bytes = new Uint8Array(dataAt + 16 * dynamic.length);
  const v = new DataView(bytes.buffer);
  writeElfHeaders(bytes, "aarch64", [
    { type: PT_LOAD, flags: PF_R | PF_X, at: 0, fileSize: textEnd, memorySize: textEnd, alignment: PAGE },
    { type: PT_LOAD, flags: PF_R | PF_W, at: dataAt, fileSize: bytes.length - dataAt, memorySize: bytes.length - dataAt, alignment: PAGE },
    { type: PT_DYNAMIC, flags: PF_R | PF_W, at: dataAt, fileSize: 16 * dynamic.length, memorySize: 16 * dynamic.length, alignment: 8 },
    { type: PT_GNU_PROPERTY, flags: PF_R, at: noteAt, fileSize: noteSize, memorySize: noteSize, alignment: 8 },
    // Without PT_GNU_STACK the loader would make every thread's stack executable.
    { type: PT_GNU_STACK, flags: PF_R | PF_W, at: 0, fileSize: 0, memorySize: 0, alignment: 16 },
  ]);
  bytes.set(note, noteAt);
  writeSysvHash(v, hashAt, 1, [name]);
  const symbol = symAt + SYM;
  v.setUint32(symbol, 1 + soname.length + 1, true); // st_name
  bytes[symbol + 4] = 0x12; //                          STB_GLOBAL, STT_FUNC
  v.setUint16(symbol + 6, 1, true); //                  a defined section
  v.setBigUint64(symbol + 8, BigInt(textAt), true);
  v.setBigUint64(symbol + 16, BigInt(code.length), true);
  bytes.set(strtab, strAt);
  bytes.set(code, textAt);
  dynamic.forEach(([tag, value], i) => {
    v.setBigUint64(dataAt + 16 * i, BigInt(tag), true);
    v.setBigUint64(dataAt + 16 * i + 8, BigInt(value), true);
  });
  return { bytes, name };
}
