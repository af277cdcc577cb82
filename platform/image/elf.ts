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

const utf8 = new TextEncoder();

/** The System V ELF hash of a symbol name (DT_HASH). */
export function elfHash(name: string | Uint8Array): number {
  const bytes = typeof name === "string" ? utf8.encode(name) : name;
  let h = 0;
  // An index loop: the first stub library is built before any of this is compiled, and an
  // interpreted iterator costs most of that build.
  for (let i = 0; i < bytes.length; i++) {
    h = ((h << 4) + bytes[i]!) >>> 0;
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
  // All the names in one encoding, each ended by its NUL, after the empty name at 0.
  const strtab = utf8.encode(`\0${strings.join("\0")}\0`);
  const nameAt: number[] = [];
  for (let at = 1; at < strtab.length; at = strtab.indexOf(0, at) + 1) nameAt.push(at);
  const encoded = nameAt.map((at) => strtab.subarray(at, strtab.indexOf(0, at)));
  const nbucket = Math.max(1, Math.ceil(count / 2));
  const nsyms = count + 1;
  const hashAt = EHDR + PHDR * 4; // four program headers
  const hashSize = 4 * (2 + nbucket + nsyms);
  const symAt = align(hashAt + hashSize, 8);
  const strAt = symAt + SYM * nsyms;
  const textAt = align(strAt + strtab.length, 16);
  const stubStride = align(stubSize, 16);
  const textEnd = textAt + stubStride * count;
  const dataAt = align(textEnd, PAGE);
  const dynamic: [number, number][] = [
    [DT_HASH, hashAt], [DT_STRTAB, strAt], [DT_SYMTAB, symAt], [DT_STRSZ, strtab.length],
    [DT_SYMENT, SYM], [DT_SONAME, nameAt[0]!], [DT_NULL, 0],
  ];
  const slotsAt = dataAt + align(dynamic.length * 16, 16);
  const end = slotsAt + 8 * count;
  const bytes = new Uint8Array(end);
  const v = new DataView(bytes.buffer);
  const u16 = (at: number, x: number) => v.setUint16(at, x, true);
  const u32 = (at: number, x: number) => v.setUint32(at, x, true);
  const u64 = (at: number, x: number) => v.setBigUint64(at, BigInt(x), true);

  writeElfHeaders(bytes, options.machine, [
    { type: PT_LOAD, flags: PF_R | PF_X, at: 0, fileSize: textEnd, memorySize: textEnd, alignment: PAGE },
    { type: PT_LOAD, flags: PF_R | PF_W, at: dataAt, fileSize: end - dataAt, memorySize: end - dataAt, alignment: PAGE },
    { type: PT_DYNAMIC, flags: PF_R | PF_W, at: dataAt, fileSize: dynamic.length * 16, memorySize: dynamic.length * 16, alignment: 8 },
    // Without PT_GNU_STACK the loader would make every thread's stack executable for us.
    { type: PT_GNU_STACK, flags: PF_R | PF_W, at: 0, fileSize: 0, memorySize: 0, alignment: 16 },
  ]);
  writeSysvHash(v, hashAt, nbucket, encoded.slice(1));

  for (let i = 0; i < count; i++) {
    const s = symAt + SYM * (i + 1);
    const stub = textAt + stubStride * i;
    u32(s, nameAt[i + 1]!);
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

/** One segment's program header; in these images a segment's file offset is its address. */
export interface Segment {
  readonly type: number;
  readonly flags: number;
  readonly at: number;
  readonly fileSize: number;
  readonly memorySize: number;
  readonly alignment: number;
}

/** Writes the ELF header of a shared object for `machine` and its program headers, right after it. */
export function writeElfHeaders(bytes: Uint8Array, machine: keyof typeof MACHINES, segments: readonly Segment[]): void {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  bytes.set([0x7f, 0x45, 0x4c, 0x46, 2 /* 64-bit */, 1 /* little-endian */, 1 /* version */], 0);
  v.setUint16(16, 3, true); // ET_DYN
  v.setUint16(18, MACHINES[machine], true);
  v.setUint32(20, 1, true);
  v.setBigUint64(32, BigInt(EHDR), true); // e_phoff
  v.setUint16(52, EHDR, true);
  v.setUint16(54, PHDR, true);
  v.setUint16(56, segments.length, true);
  v.setUint16(58, 64, true); // e_shentsize; no section headers
  segments.forEach((segment, i) => {
    const p = EHDR + PHDR * i;
    v.setUint32(p, segment.type, true);
    v.setUint32(p + 4, segment.flags, true);
    for (const [field, value] of [[8, segment.at], [16, segment.at], [24, segment.at], [32, segment.fileSize],
      [40, segment.memorySize], [48, segment.alignment]] as const) {
      v.setBigUint64(p + field, BigInt(value), true); // p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
    }
  });
}

/**
 * Writes a DT_HASH table at `at` over symbols 1..names.length (symbol 0 is the null one): buckets
 * of symbol indices chained by name hash.
 */
export function writeSysvHash(v: DataView, at: number, nbucket: number, names: readonly (string | Uint8Array)[]): void {
  const nsyms = names.length + 1;
  v.setUint32(at, nbucket, true);
  v.setUint32(at + 4, nsyms, true);
  const bucket = (i: number) => at + 8 + 4 * i;
  const chain = (i: number) => at + 8 + 4 * nbucket + 4 * i;
  for (let s = 1; s < nsyms; s++) {
    const b = elfHash(names[s - 1]!) % nbucket;
    v.setUint32(chain(s), v.getUint32(bucket(b), true), true);
    v.setUint32(bucket(b), s, true);
  }
}

function align(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}
