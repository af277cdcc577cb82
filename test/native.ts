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
  memcmp: { parameters: ["buffer", "buffer", "usize"], result: "i32" },
  qsort: { parameters: ["buffer", "usize", "usize", "pointer"], result: "void" },
  pthread_create: { parameters: ["buffer", "pointer", "pointer", "buffer"], result: "i32" },
  pthread_join: { parameters: ["u64", "pointer"], result: "i32" },
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

// Runs `fn(arg)` on a new native thread and waits for it: the JS thread blocks in pthread_join
// while the other thread calls the function pointer in `record[0]` and stores its result in
// `record[1]`. thread_main(record):
const THREAD_MAIN = [
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
