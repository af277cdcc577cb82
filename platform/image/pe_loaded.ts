/**
 * Reading PE32+ images as the Windows loader mapped them: the image size, the export directory
 * (with forwarders and the extents `.pdata` gives functions) and the import address table with
 * the names its import descriptors give each slot. Pure functions over a `read(address, length)`
 * the caller checks against the memory map, as platform/image/elf_loaded.ts does for ELF.
 */
import { hex, RedefineError } from "../../src/errors.ts";
import type { Reader } from "./elf_loaded.ts";

/** An export of a loaded PE image. */
export interface PeExport {
  readonly name: string;
  /** Where the export lives; 0n for a forwarder. */
  readonly address: bigint;
  /** `OTHER.name` when the export forwards to another DLL's (its address is the loader's to find). */
  readonly forwarder?: string;
  /** From the `.pdata` entry that begins there; 0 when none does (leaf functions, data). */
  readonly size: number;
  /** In a section the image marks executable. */
  readonly executable: boolean;
}

/** One slot of a loaded PE image's import address table. */
export interface PeImport {
  /** The imported name, or `#ordinal` for an import by ordinal. */
  readonly name: string;
  /** The DLL the import descriptor names. */
  readonly from: string;
  readonly slot: bigint;
  readonly target: bigint;
}

const IMAGE_SCN_MEM_EXECUTE = 0x20000000;
const EXPORT = 0, IMPORT = 1, EXCEPTION = 3;
const ORDINAL_FLAG = 2n ** 63n;

function fields(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** The headers that locate everything else. */
interface Headers {
  readonly sizeOfImage: number;
  /** Data directory `i`: RVA and size (0, 0 when absent). */
  directory(i: number): { rva: number; size: number };
  readonly sections: readonly { rva: number; size: number; characteristics: number }[];
}

function headers(read: Reader, base: bigint): Headers {
  const nt = base + BigInt(fields(read(base + 0x3cn, 4)).getUint32(0, true));
  const file = fields(read(nt, 24));
  if (file.getUint32(0, true) !== 0x4550) { // "PE\0\0"
    throw new RedefineError("INVALID_ADDRESS", `the module at ${hex(base)} has no PE header: it is not a loaded image.`);
  }
  const sectionCount = file.getUint16(6, true);
  const optionalSize = file.getUint16(20, true);
  const optional = fields(read(nt + 24n, optionalSize));
  const directories = optional.getUint32(108, true);
  const table = fields(read(nt + 24n + BigInt(optionalSize), 40 * sectionCount));
  return {
    sizeOfImage: optional.getUint32(56, true),
    directory: (i) =>
      i < directories
        ? { rva: optional.getUint32(112 + 8 * i, true), size: optional.getUint32(116 + 8 * i, true) }
        : { rva: 0, size: 0 },
    sections: Array.from({ length: sectionCount }, (_, i) => ({
      size: table.getUint32(40 * i + 8, true),
      rva: table.getUint32(40 * i + 12, true),
      characteristics: table.getUint32(40 * i + 36, true),
    })),
  };
}

/** The bytes from `base` to the end of the image, as its header gives them. */
export function peImageSize(read: Reader, base: bigint): number {
  return headers(read, base).sizeOfImage;
}

/** The NUL-terminated text at `address`, read in pieces that never cross a 4 KiB page. */
function cStringAt(read: Reader, address: bigint, limit = 512): string {
  const bytes: number[] = [];
  for (let at = address; bytes.length < limit;) {
    const room = 4096n - at % 4096n;
    const chunk = read(at, Number(room < 64n ? room : 64n));
    const end = chunk.indexOf(0);
    bytes.push(...(end < 0 ? chunk : chunk.subarray(0, end)));
    if (end >= 0) break;
    at += BigInt(chunk.length);
  }
  return new TextDecoder().decode(Uint8Array.from(bytes));
}

/** The named exports of the image at `base`. */
export function peExports(read: Reader, base: bigint): PeExport[] {
  const h = headers(read, base);
  const { rva, size } = h.directory(EXPORT);
  if (rva === 0) return [];
  const directory = fields(read(base + BigInt(rva), 40));
  const functionCount = directory.getUint32(20, true);
  const nameCount = directory.getUint32(24, true);
  const functions = fields(read(base + BigInt(directory.getUint32(28, true)), 4 * functionCount));
  const names = fields(read(base + BigInt(directory.getUint32(32, true)), 4 * nameCount));
  const ordinals = fields(read(base + BigInt(directory.getUint32(36, true)), 2 * nameCount));
  const extents = functionExtents(read, base, h);
  const exports: PeExport[] = [];
  for (let i = 0; i < nameCount; i++) {
    const name = cStringAt(read, base + BigInt(names.getUint32(4 * i, true)));
    const ordinal = ordinals.getUint16(2 * i, true);
    if (ordinal >= functionCount) continue;
    const target = functions.getUint32(4 * ordinal, true);
    // An RVA inside the export directory is a forwarder's "DLL.name" text.
    if (target >= rva && target < rva + size) {
      exports.push({ name, address: 0n, forwarder: cStringAt(read, base + BigInt(target)), size: 0, executable: true });
      continue;
    }
    const section = h.sections.find((s) => target >= s.rva && target < s.rva + s.size);
    exports.push({
      name,
      address: base + BigInt(target),
      size: extents.get(target) ?? 0,
      executable: section !== undefined && (section.characteristics & IMAGE_SCN_MEM_EXECUTE) !== 0,
    });
  }
  return exports;
}

/** Function begin RVA → length, from the exception directory's RUNTIME_FUNCTION entries. */
function functionExtents(read: Reader, base: bigint, h: Headers): Map<number, number> {
  const { rva, size } = h.directory(EXCEPTION);
  const extents = new Map<number, number>();
  if (rva === 0 || size < 12) return extents;
  const table = fields(read(base + BigInt(rva), size - size % 12));
  for (let at = 0; at + 12 <= table.byteLength; at += 12) {
    const begin = table.getUint32(at, true);
    extents.set(begin, table.getUint32(at + 4, true) - begin);
  }
  return extents;
}

/** Every slot of the import address table of the image at `base`, with what it holds now. */
export function peImports(read: Reader, base: bigint): PeImport[] {
  const { rva } = headers(read, base).directory(IMPORT);
  if (rva === 0) return [];
  const imports: PeImport[] = [];
  for (let descriptor = base + BigInt(rva); ; descriptor += 20n) {
    // IMAGE_IMPORT_DESCRIPTOR: OriginalFirstThunk, TimeDateStamp, ForwarderChain, Name, FirstThunk
    const d = fields(read(descriptor, 20));
    const lookup = d.getUint32(0, true), nameRva = d.getUint32(12, true), iat = d.getUint32(16, true);
    if (nameRva === 0 && iat === 0) break;
    // Without a lookup table the names were in the IAT, which the loader has overwritten.
    if (lookup === 0) continue;
    const from = cStringAt(read, base + BigInt(nameRva));
    for (let i = 0n; ; i++) {
      const entry = fields(read(base + BigInt(lookup) + 8n * i, 8)).getBigUint64(0, true);
      if (entry === 0n) break;
      const slot = base + BigInt(iat) + 8n * i;
      const name = entry >= ORDINAL_FLAG
        ? `#${Number(entry % 65536n)}`
        : cStringAt(read, base + BigInt(entry % 2n ** 31n) + 2n); // IMAGE_IMPORT_BY_NAME: Hint u16, Name
      imports.push({ name, from, slot, target: fields(read(slot, 8)).getBigUint64(0, true) });
    }
  }
  return imports;
}
