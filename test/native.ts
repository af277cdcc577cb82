/**
 * Test-side native helpers: libc functions to call as a real native caller would, and
 * hand-assembled functions placed in memory the test maps itself.
 */
import { unlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { platform } from "../platform/mod.ts";
import { PROT_EXEC, PROT_READ, PROT_WRITE } from "../platform/mod.ts";

export const { runtime, os } = platform();

/** True on arm64: hand-assembled functions come in one version per instruction set. */
export const isArm64 = runtime.arch === "aarch64" || runtime.arch === "arm64";

/** aarch64 instruction words as the little-endian bytes `assemble` takes. */
export function words(...list: number[]): number[] {
  return list.flatMap((word) => [word & 0xff, (word >>> 8) & 0xff, (word >>> 16) & 0xff, word >>> 24]);
}

/** A 64-bit address as the 8 little-endian bytes of a `.quad` in hand-assembled code. */
export function quad(address: bigint): number[] {
  const bytes = new Uint8Array(8);
  new DataView(bytes.buffer).setBigUint64(0, address, true);
  return [...bytes];
}

/**
 * libc as a native caller sees it, bound with the runtime's FFI. Those the tests redefine with JS
 * replacements and that take a pointer are bound `callback: true`, off node:ffi's fast path (see
 * Binding); the others have no way off it.
 */
export const libc = runtime.open("libc.so.6", {
  getpid: { parameters: [], result: "i32" },
  getppid: { parameters: [], result: "i32" },
  labs: { parameters: ["i64"], result: "i64" },
  imaxabs: { parameters: ["i64"], result: "i64" },
  atoi: { parameters: ["buffer"], result: "i32" },
  strtol: { parameters: ["buffer", "pointer", "i32"], result: "i64", callback: true },
  strlen: { parameters: ["buffer"], result: "u64", callback: true },
  memcmp: { parameters: ["buffer", "buffer", "usize"], result: "i32", callback: true },
  qsort: { parameters: ["buffer", "usize", "usize", "pointer"], result: "void" },
  pthread_create: { parameters: ["buffer", "pointer", "pointer", "buffer"], result: "i32" },
  pthread_join: { parameters: ["u64", "pointer"], result: "i32" },
  mmap: { parameters: ["usize", "usize", "i32", "i32", "i32", "i64"], result: "usize" },
  mprotect: { parameters: ["usize", "usize", "i32"], result: "i32" },
  munmap: { parameters: ["usize", "usize"], result: "i32" },
  open: { parameters: ["buffer", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
});

/** A NUL-terminated C string. */
export function cstr(text: string): Uint8Array {
  return new TextEncoder().encode(text + "\0");
}

/** The bytes at `address`, copied. */
export function bytesAt(address: bigint, length: number): Uint8Array {
  return runtime.view(address, length).slice();
}

/** The protection of the page holding `address`, from /proc/self/maps. */
export function protectionAt(address: bigint): number {
  return os.mappingAt(address)!.protection;
}

/**
 * Every writable+executable mapping of a file (libraries, redefine's memfd code pool), as
 * "start-end path" lines. Anonymous ones belong to the runtime's JIT, which grows and splits them
 * as it compiles (under qemu-user, also whenever qemu translates code from one of their pages).
 */
export function writableExecutable(): string[] {
  return os.mappings()
    .filter((m) => m.path !== "" && (m.protection & (PROT_WRITE | PROT_EXEC)) === (PROT_WRITE | PROT_EXEC))
    .map((m) => `${m.start.toString(16)}-${m.end.toString(16)} ${m.path}`);
}

const MAP_PRIVATE = 0x02;
const MAP_FIXED = 0x10;
const MAP_ANONYMOUS = 0x20;
const MAP_FIXED_NOREPLACE = 0x100000;

/** Maps `pages` fresh read+write pages (at `at`, which must be free, if given). */
export function mapPages(pages: number, at = 0n): bigint {
  const size = BigInt(pages * os.pageSize);
  const flags = MAP_PRIVATE | MAP_ANONYMOUS | (at === 0n ? 0 : MAP_FIXED_NOREPLACE);
  const address = libc.mmap(at, size, PROT_READ | PROT_WRITE, flags, -1, 0n) as bigint;
  if (address === 2n ** 64n - 1n || (at !== 0n && address !== at)) throw new Error("mmap failed");
  return address;
}

/**
 * Places `code` in two fresh pages, starting `offset` bytes into the first (a negative offset counts
 * from the end of the first page, so the function can straddle the boundary), and makes both pages
 * read+execute (at `base`, where an earlier `assemble` placed them and `unassemble` freed them, if
 * given). Returns the function's address and the start of the two pages.
 *
 * An inaccessible page on either side keeps them a mapping of their own: qemu-user 7.2 lists guest
 * mappings by the host mappings that hold them, and the host merges read+execute guest pages with
 * read-only neighbours (qemu maps guest code without host execute), so with 16 KiB guest pages
 * fresh code pages went missing from /proc/self/maps.
 */
export function assemble(code: readonly number[], offset = 0, where?: bigint): { address: bigint; base: bigint } {
  const page = BigInt(os.pageSize);
  const base = mapPages(4, where === undefined ? 0n : where - page) + page;
  const at = base + BigInt(offset >= 0 ? offset : os.pageSize + offset);
  runtime.view(at, code.length).set(code);
  if (libc.mprotect(base - page, page, 0) !== 0 || libc.mprotect(base + 2n * page, page, 0) !== 0) {
    throw new Error("mprotect failed");
  }
  if (libc.mprotect(base, 2n * page, PROT_READ | PROT_EXEC) !== 0) throw new Error("mprotect failed");
  return { address: at, base };
}

/**
 * Maps `pages` pages of a fresh file holding `code` at its start, read+execute and private, over
 * whatever is mapped at `at` (MAP_FIXED), as a library's loader maps its file: the mapping names
 * the file (device and inode) as a library's does.
 */
export function mapCodeFile(code: readonly number[], at: bigint, pages = 2): void {
  const path = join(tmpdir(), `redefine-code-${process.pid}-${at.toString(16)}-${Math.random().toString(36).slice(2)}`);
  const bytes = new Uint8Array(pages * os.pageSize);
  bytes.set(code);
  writeFileSync(path, bytes);
  try {
    const fd = libc.open(cstr(path), 0 /* O_RDONLY */) as number;
    if (fd < 0) throw new Error(`open of ${path} failed`);
    const address = libc.mmap(at, BigInt(bytes.length), PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_FIXED, fd, 0n) as bigint;
    libc.close(fd);
    if (address !== at) throw new Error(`mmap of ${path} failed`);
  } finally {
    unlinkSync(path);
  }
}

/** Unmaps what `assemble` mapped. */
export function unassemble(base: bigint): void {
  libc.munmap(base - BigInt(os.pageSize), BigInt(4 * os.pageSize));
}

/**
 * A page of code the kernel will not make writable, on any CPU: libc's first page, mapped shared
 * and read+execute from a descriptor opened read-only (mprotect then fails with EACCES). Returns its
 * address; `munmap` it after.
 */
export function unwritableCode(): bigint {
  const path = os.symbolAt(os.symbolAddress("labs", "libc.so.6"))!.library;
  const fd = libc.open(cstr(path), 0 /* O_RDONLY */) as number;
  if (fd < 0) throw new Error(`open of ${path} failed`);
  const MAP_SHARED = 0x01;
  const page = libc.mmap(0n, BigInt(os.pageSize), PROT_READ | PROT_EXEC, MAP_SHARED, fd, 0n) as bigint;
  libc.close(fd);
  if (page === 2n ** 64n - 1n) throw new Error(`mmap of ${path} failed`);
  return page;
}

// Runs `fn(arg)` on a new native thread and waits for it: the JS thread blocks in pthread_join
// while the other thread calls the function pointer in `record[0]` and stores its result in
// `record[1]`. thread_main(record):
const THREAD_MAIN = isArm64
  ? words(
    0xa9be7bfd, // stp x29, x30, [sp, #-32]!
    0x910003fd, // mov x29, sp
    0xf9000bf3, // str x19, [sp, #16]
    0xaa0003f3, // mov x19, x0
    0xf9400270, // ldr x16, [x19]
    0xd63f0200, // blr x16
    0xf9000660, // str x0, [x19, #8]
    0xf9400bf3, // ldr x19, [sp, #16]
    0xa8c27bfd, // ldp x29, x30, [sp], #32
    0xd2800000, // mov x0, #0
    0xd65f03c0, // ret
  )
  : [
    0x53, //                   push rbx
    0x48, 0x89, 0xfb, //       mov rbx, rdi
    0xff, 0x13, //             call [rbx]
    0x48, 0x89, 0x43, 0x08, // mov [rbx+8], rax
    0x5b, //                   pop rbx
    0x31, 0xc0, //             xor eax, eax
    0xc3, //                   ret
  ];
let threadMain: bigint | undefined;

/** Calls the native function at `fn` (no arguments, 64-bit result) on another thread. */
export function callOnAnotherThread(fn: bigint): bigint {
  threadMain ??= assemble(THREAD_MAIN).address;
  const record = new BigUint64Array([fn, 0n]);
  const id = new BigUint64Array(1);
  const bytes = (a: BigUint64Array) => new Uint8Array(a.buffer);
  if (libc.pthread_create(bytes(id), 0n, threadMain, bytes(record)) !== 0) throw new Error("pthread_create failed");
  libc.pthread_join(id[0], 0n);
  return record[1];
}
