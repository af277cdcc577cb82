/**
 * A small shared library built in memory that imports `time`, `gettimeofday`, `labs` (JUMP_SLOT, as
 * calls through a PLT do) and `clock_gettime` (GLOB_DAT, as `&clock_gettime` does) through a GOT under
 * RELRO, bound at load (BIND_NOW), and exports one function per import that tail-calls through
 * that import's slot, plus a data word. Loaded with the real dynamic loader, it stands for any
 * library whose import table `callers` rewrites, on a machine with no optional library installed.
 */
import { writeElfHeaders, writeSysvHash } from "../platform/image/elf.ts";
import type { Os, Runtime } from "../platform/types.ts";

/** The imports, in slot order, and how each is bound. */
export const IMPORTS = [
  { name: "time", kind: "jump_slot" },
  { name: "gettimeofday", kind: "jump_slot" },
  { name: "clock_gettime", kind: "glob_dat" },
  { name: "labs", kind: "jump_slot" },
] as const;

type Machine = "x86_64" | "aarch64";

const PAGE = 0x10000; // the largest page size in use: segments and RELRO align to it
const EHDR = 64, PHDR = 56, SYM = 24, RELA = 24, DYN = 16, CODE = 16;
const PT_LOAD = 1, PT_DYNAMIC = 2, PT_GNU_STACK = 0x6474e551, PT_GNU_RELRO = 0x6474e552;
const PF_X = 1, PF_W = 2, PF_R = 4;
const DT_NULL = 0, DT_NEEDED = 1, DT_PLTRELSZ = 2, DT_HASH = 4, DT_STRTAB = 5, DT_SYMTAB = 6, DT_RELA = 7,
  DT_RELASZ = 8, DT_RELAENT = 9, DT_STRSZ = 10, DT_SYMENT = 11, DT_SONAME = 14, DT_PLTREL = 20,
  DT_JMPREL = 23, DT_FLAGS = 30, DT_FLAGS_1 = 0x6ffffffb;
const DF_BIND_NOW = 8, DF_1_NOW = 1;
const STT_OBJECT = 1, STT_FUNC = 2, STB_GLOBAL = 1;
const RELOCATION = {
  x86_64: { jumpSlot: 7, globDat: 6 }, // R_X86_64_JUMP_SLOT, R_X86_64_GLOB_DAT
  aarch64: { jumpSlot: 1026, globDat: 1025 }, // R_AARCH64_JUMP_SLOT, R_AARCH64_GLOB_DAT
} as const;

/** A tail call through the 8-byte slot at offset `slot`, placed at offset `at` (position independent). */
function tailCall(machine: Machine, at: number, slot: number): number[] {
  if (machine === "x86_64") {
    const rel = slot - (at + 6);
    return [0xff, 0x25, rel & 0xff, (rel >>> 8) & 0xff, (rel >>> 16) & 0xff, rel >>> 24]; // jmp qword [rip+rel]
  }
  const words = [
    0x58000010 + (((slot - at) / 4) << 5), // ldr x16, slot (pc-relative literal, ±1 MiB)
    0xd61f0200, // br x16
  ];
  return words.flatMap((w) => [w & 0xff, (w >>> 8) & 0xff, (w >>> 16) & 0xff, w >>> 24]);
}

/** What the image holds, as offsets from its load address. */
export interface ImportLibrary {
  readonly bytes: Uint8Array;
  readonly soname: string;
  /** The exported function that calls import `i` through its slot. */
  caller(i: number): string;
  /** The exported 8-byte data word. */
  readonly data: string;
  /** Offset of import `i`'s slot. */
  slotOffset(i: number): number;
}

/** Builds the library; `prefix` keeps its exported names apart from any other copy's. */
export function buildImportLibrary(machine: Machine, prefix: string): ImportLibrary {
  const soname = `${prefix}imports.so`;
  const caller = (i: number) => `${prefix}${IMPORTS[i].name}`;
  const data = `${prefix}data`;
  // Symbols: 0 null, 1..n the imports (undefined), then the callers, then the data word.
  const names = [...IMPORTS.map((i) => i.name), ...IMPORTS.map((_, i) => caller(i)), data];
  const strtab: number[] = [0];
  const nameAt = (text: string) => {
    const at = strtab.length;
    strtab.push(...new TextEncoder().encode(text), 0);
    return at;
  };
  const libcAt = nameAt("libc.so.6");
  const sonameAt = nameAt(soname);
  const symbolNames = names.map(nameAt);
  const nsyms = names.length + 1;
  const n = IMPORTS.length;
  const phnum = 5;
  const hashAt = EHDR + PHDR * phnum;
  const nbucket = 3;
  const symAt = align(hashAt + 4 * (2 + nbucket + nsyms), 8);
  const strAt = symAt + SYM * nsyms;
  const relaAt = align(strAt + strtab.length, 8);
  const jumpSlots = IMPORTS.filter((i) => i.kind === "jump_slot").length;
  const jmprelAt = relaAt + RELA * (n - jumpSlots);
  const textAt = align(jmprelAt + RELA * jumpSlots, 16);
  const textEnd = textAt + CODE * n;
  const dataAt = align(textEnd, PAGE);
  const dynamicCount = 16;
  const gotAt = dataAt + DYN * dynamicCount;
  const wordAt = dataAt + PAGE; // after RELRO, which covers whole pages only
  const bytes = new Uint8Array(gotAt + 8 * n);
  const v = new DataView(bytes.buffer);
  const u16 = (at: number, x: number) => v.setUint16(at, x, true);
  const u32 = (at: number, x: number) => v.setUint32(at, x, true);
  const u64 = (at: number, x: number | bigint) => v.setBigUint64(at, BigInt(x), true);

  const segment = (type: number, flags: number, at: number, fileSize: number, memorySize: number) =>
    ({ type, flags, at, fileSize, memorySize, alignment: type === PT_LOAD ? PAGE : 8 });
  writeElfHeaders(bytes, machine, [
    segment(PT_LOAD, PF_R | PF_X, 0, textEnd, textEnd),
    segment(PT_LOAD, PF_R | PF_W, dataAt, bytes.length - dataAt, wordAt + 8 - dataAt),
    segment(PT_DYNAMIC, PF_R | PF_W, dataAt, DYN * dynamicCount, DYN * dynamicCount),
    segment(PT_GNU_RELRO, PF_R, dataAt, bytes.length - dataAt, PAGE),
    segment(PT_GNU_STACK, PF_R | PF_W, 0, 0, 0),
  ]);
  // DT_HASH over every symbol (the loader skips the undefined ones)
  writeSysvHash(v, hashAt, nbucket, names);

  const symbol = (index: number, type: number, value: number, size: number) => {
    const s = symAt + SYM * index;
    u32(s, symbolNames[index - 1]);
    bytes[s + 4] = STB_GLOBAL * 16 + type;
    u16(s + 6, value === 0 ? 0 : 1); // SHN_UNDEF for imports, any section index for definitions
    u64(s + 8, value);
    u64(s + 16, size);
  };
  IMPORTS.forEach((_, i) => symbol(1 + i, STT_FUNC, 0, 0));
  IMPORTS.forEach((_, i) => {
    const at = textAt + CODE * i;
    symbol(1 + n + i, STT_FUNC, at, CODE);
    bytes.set(tailCall(machine, at, gotAt + 8 * i), at);
  });
  symbol(1 + 2 * n, STT_OBJECT, wordAt, 8);
  bytes.set(strtab, strAt);

  let glob = 0, jump = 0;
  IMPORTS.forEach((imported, i) => {
    const at = imported.kind === "glob_dat" ? relaAt + RELA * glob++ : jmprelAt + RELA * jump++;
    u64(at, gotAt + 8 * i); // r_offset
    u32(at + 8, imported.kind === "glob_dat" ? RELOCATION[machine].globDat : RELOCATION[machine].jumpSlot);
    u32(at + 12, 1 + i); // symbol index, the high half of r_info
  });

  const dynamic: [number, number][] = [
    [DT_NEEDED, libcAt], [DT_SONAME, sonameAt], [DT_HASH, hashAt], [DT_STRTAB, strAt], [DT_SYMTAB, symAt],
    [DT_STRSZ, strtab.length], [DT_SYMENT, SYM], [DT_RELA, relaAt], [DT_RELASZ, RELA * glob],
    [DT_RELAENT, RELA], [DT_JMPREL, jmprelAt], [DT_PLTRELSZ, RELA * jump], [DT_PLTREL, DT_RELA],
    [DT_FLAGS, DF_BIND_NOW], [DT_FLAGS_1, DF_1_NOW], [DT_NULL, 0],
  ];
  dynamic.forEach(([tag, value], i) => {
    u64(dataAt + DYN * i, tag);
    u64(dataAt + DYN * i + 8, value);
  });

  return { bytes, soname, caller, data, slotOffset: (i) => gotAt + 8 * i };
}

/** The library loaded by the runtime's own loader, with its callers bound from JS. */
export function loadImportLibrary(runtime: Runtime, os: Os, prefix: string): {
  library: ImportLibrary;
  path: string;
  /** `time(NULL)`, `gettimeofday(tv, NULL)`, `clock_gettime(id, ts)`, `labs(x)` as the library calls them. */
  time(): bigint;
  gettimeofday(tv: Uint8Array): number;
  clockGettime(id: number, ts: Uint8Array): number;
  labs(x: bigint): bigint;
} {
  const machine = runtime.arch === "aarch64" || runtime.arch === "arm64" ? "aarch64" : "x86_64";
  const library = buildImportLibrary(machine, prefix);
  const path = os.loadableImage(library.bytes);
  const symbols = runtime.open(path, {
    [library.caller(0)]: { parameters: ["pointer"], result: "i64" },
    [library.caller(1)]: { parameters: ["buffer", "pointer"], result: "i32" },
    [library.caller(2)]: { parameters: ["i32", "buffer"], result: "i32" },
    [library.caller(3)]: { parameters: ["i64"], result: "i64" },
  });
  return {
    library,
    path,
    time: () => symbols[library.caller(0)](0n) as bigint,
    gettimeofday: (tv) => symbols[library.caller(1)](tv, 0n) as number,
    clockGettime: (id, ts) => symbols[library.caller(2)](id, ts) as number,
    labs: (x) => symbols[library.caller(3)](x) as bigint,
  };
}

function align(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}
