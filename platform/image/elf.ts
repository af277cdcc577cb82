/**
 * A tiny ELF shared object, generated in memory: `count` exported functions, each an indirect jump
 * through its own 8-byte slot in a writable segment. Opened with the runtime's own `dlopen`, its
 * symbols get the runtime's fast call path (Deno only has one for symbols of a dlopen'ed library),
 * and pointing a slot at any code makes that code callable at full speed.
 */

/** What the image holds and where, as offsets from its load address. */
export interface StubImage {
  readonly bytes: Uint8Array;
  /** The exported name of stub `i`. */
  name(i: number): string;
  /** Offset of stub `i`'s code. */
  stubOffset(i: number): number;
  /** Offset of stub `i`'s slot (8 bytes, aligned). */
  slotOffset(i: number): number;
}

const PAGE = 0x10000; // the largest page size in use (arm64 64 KiB kernels): segments align to it
const EHDR = 64;
const PHDR = 56;
const SYM = 24;
const PT_LOAD = 1, PT_DYNAMIC = 2, PT_GNU_STACK = 0x6474e551;
const PF_X = 1, PF_W = 2, PF_R = 4;
const DT_NULL = 0, DT_HASH = 4, DT_STRTAB = 5, DT_SYMTAB = 6, DT_STRSZ = 10, DT_SYMENT = 11, DT_SONAME = 14;
const SHN_ABS = 0xfff1;
const MACHINES = { x86_64: 62, aarch64: 183 } as const;

/** The System V ELF hash of a symbol name (DT_HASH). */
export function elfHash(name: string): number {
  let h = 0;
  for (const c of new TextEncoder().encode(name)) {
    h = ((h << 4) + c) >>> 0;
    const g = h & 0xf0000000;
    if (g) h ^= g >>> 24;
    h = (h & ~g) >>> 0;
  }
  return h;
}

/**
 * Builds the image. `jump(stub, slot)` encodes an indirect jump placed at offset `stub` through the
 * 8-byte slot at offset `slot` (offsets, since the load address is not known yet; the encoding is
 * position independent), `stubSize` bytes at most. With `targets`, symbol `i` is instead absolute
 * (SHN_ABS) with the value `targets[i]`: `dlsym` returns that address itself, so a runtime that can
 * only call symbols (Node) calls any address directly; give `stubSize` 0 then.
 */
export function buildStubImage(options: {
  machine: keyof typeof MACHINES;
  count: number;
  prefix: string;
  stubSize: number;
  jump: (stub: number, slot: number) => Uint8Array;
  targets?: readonly bigint[];
}): StubImage {
  const { count, prefix, stubSize, jump, targets } = options;
  const name = (i: number) => `${prefix}${i}`;
  const soname = `${prefix}lib.so`;
  const strings = [soname, ...Array.from({ length: count }, (_, i) => name(i))];
  const strtab: number[] = [0];
  const nameAt: number[] = [];
  for (const s of strings) {
    nameAt.push(strtab.length);
    strtab.push(...new TextEncoder().encode(s), 0);
  }
  const nbucket = Math.max(1, Math.ceil(count / 2));
  const nsyms = count + 1;
  const phnum = 4;
  const hashAt = EHDR + PHDR * phnum;
  const hashSize = 4 * (2 + nbucket + nsyms);
  const symAt = align(hashAt + hashSize, 8);
  const strAt = symAt + SYM * nsyms;
  const textAt = align(strAt + strtab.length, 16);
  const stubStride = align(stubSize, 16);
  const textEnd = textAt + stubStride * count;
  const dataAt = align(textEnd, PAGE);
  const dynamic: [number, number][] = [
    [DT_HASH, hashAt], [DT_STRTAB, strAt], [DT_SYMTAB, symAt], [DT_STRSZ, strtab.length],
    [DT_SYMENT, SYM], [DT_SONAME, nameAt[0]], [DT_NULL, 0],
  ];
  const slotsAt = dataAt + align(dynamic.length * 16, 16);
  const end = slotsAt + 8 * count;
  const bytes = new Uint8Array(end);
  const v = new DataView(bytes.buffer);
  const u16 = (at: number, x: number) => v.setUint16(at, x, true);
  const u32 = (at: number, x: number) => v.setUint32(at, x, true);
  const u64 = (at: number, x: number) => v.setBigUint64(at, BigInt(x), true);

  // ELF header
  bytes.set([0x7f, 0x45, 0x4c, 0x46, 2 /* 64-bit */, 1 /* little-endian */, 1 /* version */], 0);
  u16(16, 3); // ET_DYN
  u16(18, MACHINES[options.machine]);
  u32(20, 1);
  u64(32, EHDR); // e_phoff
  u16(52, EHDR);
  u16(54, PHDR);
  u16(56, phnum);
  u16(58, 64); // e_shentsize; no section headers

  const phdr = (i: number, type: number, flags: number, at: number, size: number, alignment: number) => {
    const p = EHDR + PHDR * i;
    u32(p, type);
    u32(p + 4, flags);
    u64(p + 8, at); // p_offset
    u64(p + 16, at); // p_vaddr
    u64(p + 24, at); // p_paddr
    u64(p + 32, size); // p_filesz
    u64(p + 40, size); // p_memsz
    u64(p + 48, alignment);
  };
  phdr(0, PT_LOAD, PF_R | PF_X, 0, textEnd, PAGE);
  phdr(1, PT_LOAD, PF_R | PF_W, dataAt, end - dataAt, PAGE);
  phdr(2, PT_DYNAMIC, PF_R | PF_W, dataAt, dynamic.length * 16, 8);
  // Without PT_GNU_STACK the loader would make every thread's stack executable for us.
  phdr(3, PT_GNU_STACK, PF_R | PF_W, 0, 0, 16);

  // DT_HASH: buckets of symbol indices chained by name hash
  u32(hashAt, nbucket);
  u32(hashAt + 4, nsyms);
  const bucket = (i: number) => hashAt + 8 + 4 * i;
  const chain = (i: number) => hashAt + 8 + 4 * nbucket + 4 * i;
  for (let s = 1; s < nsyms; s++) {
    const b = elfHash(name(s - 1)) % nbucket;
    u32(chain(s), v.getUint32(bucket(b), true));
    u32(bucket(b), s);
  }

  for (let i = 0; i < count; i++) {
    const s = symAt + SYM * (i + 1);
    const stub = textAt + stubStride * i;
    u32(s, nameAt[i + 1]);
    bytes[s + 4] = 0x12; // STB_GLOBAL, STT_FUNC
    const target = targets?.[i];
    // SHN_ABS: the value is the address itself; else any defined section (not SHN_UNDEF) relocates it
    u16(s + 6, target === undefined ? 1 : SHN_ABS);
    v.setBigUint64(s + 8, target ?? BigInt(stub), true);
    u64(s + 16, stubStride);
    const code = jump(stub, slotsAt + 8 * i);
    if (code.length > stubSize) throw new Error(`stub of ${code.length} bytes exceeds ${stubSize}`);
    bytes.set(code, stub);
  }
  bytes.set(strtab, strAt);
  dynamic.forEach(([tag, value], i) => {
    u64(dataAt + 16 * i, tag);
    u64(dataAt + 16 * i + 8, value);
  });

  return {
    bytes,
    name,
    stubOffset: (i) => textAt + stubStride * i,
    slotOffset: (i) => slotsAt + 8 * i,
  };
}

function align(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}
