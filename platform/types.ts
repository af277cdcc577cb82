/**
 * The two small interfaces `src/` asks of the platform: the runtime's FFI (Deno or Bun) and the
 * operating system's memory services (Linux, macOS, Windows). All addresses are `bigint`.
 */
import type { Signature } from "../src/signature.ts";

/** A native function called from JS: arguments and result as the signature's JS types. */
// deno-lint-ignore no-explicit-any
export type NativeCall = (...args: any[]) => any;

/** The reach of a jump that goes anywhere: farther than any two user-space addresses are apart. */
export const ANYWHERE = 2n ** 62n;

/**
 * How the CPU checks the branches that enter a function's code, as the platform tells for its
 * pages (arm64: Branch Target Identification and the Guarded Control Stack; x86-64 user space has
 * neither check on Linux). What the trampoline's jumps back into the function may be follows.
 */
export interface BranchChecks {
  /**
   * An indirect jump or call (`br`, `blr`) into the code must land on a landing pad (`bti`): the
   * CPU has BTI and the pages are guarded (PROT_BTI), or may be.
   */
  readonly landingPads: boolean;
  /** Every return is checked against a shadow stack (GCS): a `ret` goes only where a call came from. */
  readonly shadowStack: boolean;
}

/** No check: any branch may land anywhere. */
export const UNCHECKED: BranchChecks = { landingPads: false, shadowStack: false };

/** One symbol for `Runtime.open` to bind. */
export interface Binding extends Signature {
  /** A missing symbol comes back undefined instead of failing the whole open. */
  readonly optional?: boolean;
  /**
   * The call may run JS before it returns (its callee redefined with a JS replacement): V8 aborts
   * when it deoptimizes the caller during a fast API call that returns a value. node:ffi keeps a
   * signature with a `function` argument off its Fast API path, so Node binds pointer-like
   * parameters as `function`; a signature without one has no way off it. Deno 2.9 has no per-symbol
   * opt-out (it ignores this key); Bun's JavaScriptCore has no V8 fast calls.
   */
  readonly callback?: boolean;
}

/** A JS function turned into a native function pointer; valid until `close()`. */
export interface NativeCallback {
  readonly address: bigint;
  close(): void;
}

/** What each runtime adapter (platform/deno.ts, platform/bun.ts, platform/node.ts) provides. */
export interface Runtime {
  readonly name: "deno" | "bun" | "node";
  /** `"linux"`, `"darwin"` or `"windows"` (anything else is refused by platform/mod.ts). */
  readonly os: string;
  /** `"x86_64"` or `"aarch64"`, whatever the runtime calls it. */
  readonly arch: string;
  /**
   * Opens a library with the runtime's loader and binds `symbols`. `optional` symbols that are
   * missing come back undefined. Throws FFI_PERMISSION / LIBRARY_NOT_FOUND.
   */
  open<K extends string>(path: string, symbols: Record<K, Binding>): Record<K, NativeCall>;
  /** A live view of `length` bytes of native memory at `address`. */
  view(address: bigint, length: number): Uint8Array;
  /** The NUL-terminated string at `address`. */
  cString(address: bigint): string;
  /** A native function pointer that runs `fn` on the JS thread. */
  callback(signature: Signature, fn: NativeCall): NativeCallback;
  /** A JS callable for the native function at `address`. */
  fnPointer(address: bigint, signature: Signature): NativeCall;
  /**
   * Whether a call through `fnPointer` takes a slow path (Deno: hundreds of ns a call, against a
   * few for a symbol of an opened library), so a callable called often is better bound otherwise;
   * there a callable is cheap to make, so one called only a few times is made so rather than bound
   * (platform/lazy_library.ts).
   */
  readonly slowPointerCalls?: boolean;
}

/** One line of the process's memory map. */
export interface Mapping {
  readonly start: bigint;
  readonly end: bigint;
  /** Protection bits: PROT_READ 1, PROT_WRITE 2, PROT_EXEC 4. */
  readonly protection: number;
  readonly path: string;
  /** The file it maps, where the system tells (Linux); absent for anonymous memory. */
  readonly file?: MappedFile | undefined;
  /**
   * The allocation holding it, where the system tells (Windows): with `end` and `protection`,
   * what tells it from memory allocated at the same place later (see `sameMemory`).
   */
  readonly allocation?: Allocation | undefined;
}

/**
 * Which file a mapping maps, and from where: what tells a library's memory from whatever was
 * mapped at the same place once it was unloaded.
 */
export interface MappedFile {
  readonly device: number;
  readonly inode: number;
  /**
   * The mapping's start minus its offset in the file: where the file's first byte would lie, the
   * same however protection changes split or merge the mapping.
   */
  readonly base: bigint;
}

/**
 * A Windows allocation, as `VirtualQuery` tells it with each region: where it begins
 * (`AllocationBase`: for an image, the module's base) and what it is (`Type`).
 */
export interface Allocation {
  readonly base: bigint;
  /** MEM_IMAGE, MEM_MAPPED or MEM_PRIVATE. */
  readonly kind: number;
}

/**
 * Whether two mappings map the same file from the same place (the same library, not unloaded in
 * between); false when either maps no file, or its system does not tell which.
 */
export function sameFile(a: MappedFile | undefined, b: MappedFile | undefined): boolean {
  return a !== undefined && b !== undefined && a.device === b.device && a.inode === b.inode && a.base === b.base;
}

/**
 * Whether the mapping `now` holds the same memory as `then`, both found at one address: the code
 * there is what it was, unless it was unmapped and other code mapped in its place since. A file's
 * mapping (Linux) is the same while the same file is mapped from the same place, however
 * protection changes split or merge it. Memory that names no file (anonymous memory, a JIT's, all
 * of Darwin's and Windows') is the same while its region has the same extent and protection
 * (Windows: the same allocation, with the same end and protection, a region's `start` being the
 * page asked about there): a region unmapped and mapped again with exactly those passes for the
 * same, whatever code it holds now (README, "Not guaranteed").
 */
export function sameMemory(then: Mapping, now: Mapping): boolean {
  if (then === now) return true;
  if (then.file !== undefined || now.file !== undefined) return sameFile(then.file, now.file);
  if (then.end !== now.end || then.protection !== now.protection) return false;
  const a = then.allocation, b = now.allocation;
  if (a === undefined || b === undefined) return a === b && then.start === now.start;
  return a.base === b.base && a.kind === b.kind;
}

/** Protection bits, the same numbers on every system we support. */
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const PROT_EXEC = 4;

/** Executable memory with a separate writable alias: code is written through `writable`. */
export interface CodeBlock {
  /** Where the code runs (read + execute). */
  readonly address: bigint;
  /** Where the code is written (read + write); the same bytes as `address`. */
  readonly writable: bigint;
  readonly size: number;
  /** Read+write data right after the code, within reach of pc-relative operands. */
  readonly data: bigint;
  readonly dataSize: number;
}

/** A symbol's entry and, when the symbol table knows it, its size. */
export interface SymbolInfo {
  readonly name: string;
  readonly start: bigint;
  /** 0 when unknown. */
  readonly size: number;
  readonly library: string;
}

/**
 * A module the loader has in the process (the main executable, libraries, the vDSO).
 *
 * @example
 * ```ts
 * import { modules } from "@redefine/redefine";
 * import type { LoadedModule } from "@redefine/redefine";
 * const libc: LoadedModule | undefined = modules().find((m) => m.name === "libc.so.6");
 * ```
 */
export interface LoadedModule {
  /** The file name as the loader lists it (`libc.so.6`; the main executable's own file name). */
  readonly name: string;
  /** The full path (the main executable's real path; `[vdso]` for the vDSO). */
  readonly path: string;
  /** The lowest address of its image, page-aligned. */
  readonly base: bigint;
  /** Bytes from `base` to the end of its last segment, whole pages. */
  readonly size: number;
}

/**
 * A symbol a module defines for others.
 *
 * @example
 * ```ts
 * import { exports } from "@redefine/redefine";
 * import type { ModuleExport } from "@redefine/redefine";
 * const compat: ModuleExport[] = exports("libc.so.6").filter((e) => !e.default);
 * ```
 */
export interface ModuleExport {
  /** The symbol's name, without its version. */
  readonly name: string;
  /** Where a call or a reference reaches: for an indirect function, the implementation picked. */
  readonly address: bigint;
  /** 0 when unknown. */
  readonly size: number;
  /** Code, or anything else (objects, and symbols with no type). */
  readonly kind: "function" | "data";
  /** The symbol version (`GLIBC_2.2.5`), when it has one. */
  readonly version?: string;
  /** False for a compat-only version (`name@V`): only references to that version bind it. */
  readonly default: boolean;
}

/**
 * A slot the loader filled with the address of a symbol a module imports.
 *
 * @example
 * ```ts
 * import { imports } from "@redefine/redefine";
 * import type { ModuleImport } from "@redefine/redefine";
 * const calls: ModuleImport[] = imports("libm.so.6").filter((i) => i.kind === "jump_slot");
 * ```
 */
export interface ModuleImport {
  /** The imported symbol's name, without its version. */
  readonly name: string;
  /** The slot's address: 8 bytes, aligned. */
  readonly slot: bigint;
  /** What the slot holds now. */
  readonly target: bigint;
  /**
   * ELF `JUMP_SLOT` (calls through the PLT) or `GLOB_DAT` (the GOT entry of `&symbol`); PE: an
   * import address table entry; Mach-O: a lazy (`__la_symbol_ptr`) or non-lazy (`__got`) pointer.
   */
  readonly kind: "jump_slot" | "glob_dat" | "iat" | "lazy_pointer" | "non_lazy_pointer";
  /** The version the reference asks for, when it asks for one (ELF). */
  readonly version?: string;
  /** The library the import table names for it (PE, Mach-O; an ELF import names none). */
  readonly from?: string;
}

/** A range of addresses, `[start, end)`. */
export interface AddressRange {
  readonly start: bigint;
  readonly end: bigint;
}

/** One store of a sequence (`Os.storeInOrder`): `bytes` at `address`. */
export interface Store {
  readonly address: bigint;
  readonly bytes: Uint8Array;
}

/** What each OS layer (platform/linux.ts, ...) provides. */
export interface Os {
  readonly pageSize: number;
  /** The address of `symbol`, in `library` or (library omitted) anywhere in the process. */
  symbolAddress(symbol: string, library?: string): bigint;
  /** The symbol containing `address`, if the dynamic symbol table has one. */
  symbolAt(address: bigint): SymbolInfo | null;
  /** Every mapping of the process, in address order. */
  mappings(): Mapping[];
  /**
   * The mapping containing `address` (its `path` may be empty), or null when it is unmapped. `was`,
   * an answer found before for that address: where the layer can tell cheaply (Linux), it comes
   * back itself when the map says exactly the same of it now — no new object, and a caller asking
   * again and again may compare by identity.
   */
  mappingAt(address: bigint, was?: Mapping): Mapping | null;
  /** Changes the protection of whole pages; throws PROTECT_FAILED with the errno text. */
  protect(start: bigint, length: number, protection: number): void;
  /**
   * Writes `bytes` at `address` into code this process cannot write through its own mapping,
   * without changing any protection (Linux: /proc/self/mem). Returns false where the system
   * refuses that, or has no such path, and then nothing was written: the caller makes the pages
   * writable with `protect` and stores the bytes itself. One call is one copy by the kernel, which
   * threads running the code may see torn (see `protectFrom`).
   */
  forceWrite(address: bigint, bytes: Uint8Array): boolean;
  /**
   * From how many stores on a run of pages a batch takes the protection way instead of forced
   * writes, where it is not `PROTECT_FROM` (src/code_memory.ts). Linux: 1, every store into code
   * the protection way, forced writes only where `protect` is refused (the vDSO). On the Intel
   * Xeon VM of 2026-12-02 (kernel 6.18, a CPU with fast short `rep movsb`), threads running a
   * function while /proc/self/mem rewrote an aligned 8-byte word of its entry executed torn bytes:
   * a C program toggling a `jmp rel32` so, 300,000 toggles a run under two calling threads, hit
   * `int3` or got wrong results in 8 of 11 runs; the same toggles as plain 8-byte stores into a
   * writable page, paced alike, in 0 of 10; the stress test saw 126 wrong results in 178 million
   * calls in one CI run.
   */
  readonly protectFrom?: number;
  /**
   * Makes `stores` one after another by one foreign call, each whole before the next begins and
   * visible to instruction fetch when the next begins, with no JS run between them
   * (platform/stores_in_order.ts): `forced`, each the way `forceWrite` makes one, else as a
   * plain store into pages the process may write, 8 bytes in one store. Returns how many were
   * made: the first refused ends the sequence (a forced one across pages may be partly taken);
   * 0 too where the system refuses forced writes altogether. Absent where the layer has no such
   * routine: there the caller makes the stores itself.
   */
  storeInOrder?(stores: readonly Store[], forced: boolean): number;
  /**
   * Executable memory (with a writable alias) within `reach` bytes of `near`, followed by at least
   * `dataSize` bytes of data (one page when not given), or null when none can be had there. It
   * stays mapped for the life of the process: the code pool reuses it.
   */
  allocateCode(near: bigint, reach: bigint, size: number, dataSize?: number): CodeBlock | null;
  /**
   * A path the runtime's `dlopen` can open, holding `image` (a shared library built in memory, see
   * platform/image/elf.ts). It stays valid, and its bytes as given, for the life of the process.
   */
  loadableImage(image: Uint8Array): string;
  /**
   * The code of the process's main program (the runtime's executable), from its first executable
   * segment's start to its last one's end; null where the layer cannot tell. Guards send its own
   * calls to the original (src/arch/x86_64/guard.ts). Absent from layers that do not know it yet.
   */
  programText?(): AddressRange | null;
  /**
   * How the CPU checks branches into the code at `address` (arm64: BTI landing pads, GCS returns;
   * platform/branch_checks.ts). Absent where nothing is checked.
   */
  branchChecks?(address: bigint): BranchChecks;
  /** Makes freshly written code visible to instruction fetch (a no-op on x86-64). */
  flushCode(address: bigint, length: number): void;
  /**
   * Does what the layer put off until no code is half-written and no lock is held (Linux: binding
   * the C library symbols that proved busy, platform/lazy_library.ts): the registry calls it as
   * each section under its lock ends, so it never throws: the section's outcome is its body's.
   * Absent where nothing is put off.
   */
  runDeferred?(): void;
  /** Every loaded module, in the loader's order: the main executable first. */
  modules(): LoadedModule[];
  /** What `module` (one of `modules()`) exports; LIBRARY_NOT_FOUND once it is unloaded. */
  exports(module: LoadedModule): ModuleExport[];
  /** The import slots of `module` (one of `modules()`) and what each holds. */
  imports(module: LoadedModule): ModuleImport[];
}

/** The runtime and OS together: everything `src/` needs from the machine. */
export interface Platform {
  readonly runtime: Runtime;
  readonly os: Os;
}
