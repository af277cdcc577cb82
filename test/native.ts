/**
 * Test-side native helpers: libc functions to call as a real native caller would, and
 * hand-assembled functions placed in memory the test maps itself.
 */
import { platform } from "../platform/mod.ts";
import { PROT_EXEC, PROT_READ, PROT_WRITE } from "../platform/mod.ts";

export const { runtime, os } = platform();

/** libc as a native caller sees it, bound with the runtime's FFI. */
export const libc = runtime.open("libc.so.6", {
  getpid: { parameters: [], result: "i32" },
  getppid: { parameters: [], result: "i32" },
  labs: { parameters: ["i64"], result: "i64" },
  imaxabs: { parameters: ["i64"], result: "i64" },
  atoi: { parameters: ["buffer"], result: "i32" },
  strtol: { parameters: ["buffer", "pointer", "i32"], result: "i64" },
  strlen: { parameters: ["buffer"], result: "u64" },
  mmap: { parameters: ["usize", "usize", "i32", "i32", "i32", "i64"], result: "usize" },
  mprotect: { parameters: ["usize", "usize", "i32"], result: "i32" },
  munmap: { parameters: ["usize", "usize"], result: "i32" },
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

/** Every writable+executable mapping, as "start-end path" lines. */
export function writableExecutable(): string[] {
  return os.mappings()
    .filter((m) => (m.protection & (PROT_WRITE | PROT_EXEC)) === (PROT_WRITE | PROT_EXEC))
    .map((m) => `${m.start.toString(16)}-${m.end.toString(16)} ${m.path}`);
}

const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;

/** Maps `pages` fresh read+write pages. */
export function mapPages(pages: number): bigint {
  const size = BigInt(pages * os.pageSize);
  const address = libc.mmap(0n, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0n) as bigint;
  if (address === 2n ** 64n - 1n) throw new Error("mmap failed");
  return address;
}

/**
 * Places `code` in two fresh pages, starting `offset` bytes into the first (a negative offset counts
 * from the end of the first page, so the function can straddle the boundary), and makes both pages
 * read+execute. Returns the function's address and the mapping's start.
 */
export function assemble(code: readonly number[], offset = 0): { address: bigint; base: bigint } {
  const base = mapPages(2);
  const at = base + BigInt(offset >= 0 ? offset : os.pageSize + offset);
  runtime.view(at, code.length).set(code);
  if (libc.mprotect(base, BigInt(2 * os.pageSize), PROT_READ | PROT_EXEC) !== 0) throw new Error("mprotect failed");
  return { address: at, base };
}

/** Unmaps what `assemble` mapped. */
export function unassemble(base: bigint): void {
  libc.munmap(base, BigInt(2 * os.pageSize));
}
