/**
 * Just enough of ELF64 (little-endian) to list a shared library's exported functions and read
 * their bytes from the file: `.dynsym`/`.dynstr` for the symbols, `PT_LOAD` headers to turn a
 * symbol's virtual address into a file offset.
 */

import { existsSync } from "node:fs";

const LIBRARY_DIRS = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"];

/** The path of a system library, or an error naming where it was looked for. */
export function findLibrary(name: string): string {
  const dir = LIBRARY_DIRS.find((dir) => existsSync(`${dir}/${name}`));
  if (dir === undefined) throw new Error(`${name} is not in ${LIBRARY_DIRS.join(", ")}`);
  return `${dir}/${name}`;
}

/** An exported function of a shared library file. */
export interface ElfFunction {
  name: string;
  /** Virtual address as linked (the library's load address is added at run time). */
  address: bigint;
  size: number;
  /** The function's bytes as stored in the file. */
  bytes: Uint8Array;
}

const SHT_DYNSYM = 11;
const PT_LOAD = 1;
const STT_FUNC = 2;
const STT_GNU_IFUNC = 10;
const SHN_UNDEF = 0;

/** The defined `STT_FUNC` and `STT_GNU_IFUNC` symbols of `.dynsym` with a non-zero size. */
export function elfFunctions(file: Uint8Array): ElfFunction[] {
  const view = new DataView(file.buffer, file.byteOffset, file.byteLength);
  if (view.getUint32(0) !== 0x7f454c46 || file[4] !== 2 || file[5] !== 1) {
    throw new Error("not a little-endian ELF64 file");
  }
  const u64 = (at: number) => Number(view.getBigUint64(at, true));

  const loads: { offset: number; vaddr: number; filesz: number }[] = [];
  const phoff = u64(0x20);
  for (let i = 0; i < view.getUint16(0x38, true); i++) {
    const ph = phoff + i * view.getUint16(0x36, true);
    if (view.getUint32(ph, true) === PT_LOAD) {
      loads.push({ offset: u64(ph + 0x08), vaddr: u64(ph + 0x10), filesz: u64(ph + 0x20) });
    }
  }
  const fileOffset = (vaddr: number, size: number): number => {
    const load = loads.find((l) => vaddr >= l.vaddr && vaddr + size <= l.vaddr + l.filesz);
    if (load === undefined) throw new Error(`0x${vaddr.toString(16)} is in no PT_LOAD segment`);
    return load.offset + vaddr - load.vaddr;
  };

  const shoff = u64(0x28);
  const shentsize = view.getUint16(0x3a, true);
  const section = (index: number) => {
    const sh = shoff + index * shentsize;
    return {
      type: view.getUint32(sh + 0x04, true),
      offset: u64(sh + 0x18),
      size: u64(sh + 0x20),
      link: view.getUint32(sh + 0x28, true),
      entsize: u64(sh + 0x38),
    };
  };
  const functions: ElfFunction[] = [];
  const names = new TextDecoder();
  for (let i = 0; i < view.getUint16(0x3c, true); i++) {
    const dynsym = section(i);
    if (dynsym.type !== SHT_DYNSYM) continue;
    const dynstr = section(dynsym.link);
    for (let at = dynsym.offset; at < dynsym.offset + dynsym.size; at += dynsym.entsize) {
      const type = file[at + 4] & 0x0f;
      const defined = view.getUint16(at + 6, true) !== SHN_UNDEF;
      const address = u64(at + 8);
      const size = u64(at + 16);
      if ((type !== STT_FUNC && type !== STT_GNU_IFUNC) || !defined || size === 0) continue;
      const offset = fileOffset(address, size);
      const nameStart = dynstr.offset + view.getUint32(at, true);
      const name = names.decode(file.subarray(nameStart, file.indexOf(0, nameStart)));
      functions.push({
        name,
        address: BigInt(address),
        size,
        bytes: file.subarray(offset, offset + size),
      });
    }
  }
  return functions;
}
