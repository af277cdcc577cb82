/**
 * macOS memory services (x86-64 and arm64) through libSystem, called with the runtime's FFI.
 *
 * - Symbols: `dlsym` (`RTLD_DEFAULT` when no library is named). macOS symbols carry no size, so a
 *   function's extent comes from the image's `LC_FUNCTION_STARTS` table (the one every linker since
 *   2010 writes, the shared cache's images included): from a function's start to the next start,
 *   the last one ending with `__TEXT,__text`. No table: size 0, and `src/` asks for `{ size }` or
 *   falls back to the straight-line length of an exported entry.
 * - Protections: a write into code goes through `mach_vm_protect(..., VM_PROT_COPY)`, which gives
 *   this process a private copy-on-write copy of a shared, signed text page (the dyld shared cache,
 *   a signed dylib); `mprotect` cannot. On arm64 no page outside a `MAP_JIT` region may be writable
 *   and executable at once, so the page loses execute while it is written (another thread running
 *   code on that very page faults: see the README's caveats); on x86-64 it keeps it, falling back
 *   to dropping it when the system refuses write+execute.
 * - Our own code: a block is `mach_vm_allocate`d near the target and made read+execute, with a
 *   read+write alias made by `mach_vm_remap` (copy = false: the same pages) — the same W^X double
 *   mapping as Linux's memfd. `MAP_JIT` with `pthread_jit_write_protect_np` is not used: that call
 *   flips every `MAP_JIT` page of the calling thread to write-only, the JS engine's own JIT code
 *   and FFI trampolines included, and this thread is running that code when it makes the call; a
 *   write from JS through the FFI cannot be bracketed by it safely. Where the system refuses
 *   executable anonymous memory (hardened runtime without
 *   `com.apple.security.cs.allow-unsigned-executable-memory`): on x86-64, `mmap(MAP_JIT)` memory,
 *   writable and executable (the block is its own write alias); on arm64 no block (`allocateCode`
 *   returns null) and `src/` falls back to an absolute jump at the entry.
 * - Cache: `sys_icache_invalidate` after every write into code (a no-op on x86-64 machines).
 * - Maps: `mach_vm_region_recurse`, descending into submaps (the shared region), and
 *   `proc_regionfilename` for the file behind a region.
 * - Images (extents from `LC_FUNCTION_STARTS`, dyld's image list, exports, symbol pointers):
 *   platform/darwin_images.ts.
 *
 * Not run on a Mac: every call sequence is tested against a recording fake FFI
 * (test/darwin.test.ts).
 */
import { hex, RedefineError } from "../src/errors.ts";
import { nearCandidates, protectionText } from "./address_space.ts";
import { posix } from "./posix.ts";
import type { Mapping, Os, Runtime } from "./types.ts";
import { PROT_EXEC, PROT_READ, PROT_WRITE } from "./types.ts";

import { darwinImages, LIBSYSTEM } from "./darwin_images.ts";

export { decodeFunctionStarts, LIBSYSTEM } from "./darwin_images.ts";

/** `RTLD_DEFAULT` on macOS is `(void *)-2`. */
const RTLD_DEFAULT = 2n ** 64n - 2n;
/** macOS numbers `_SC_PAGESIZE` 29 (Linux: 30). */
const SC_PAGESIZE = 29;
const VM_PROT_COPY = 0x10;
const MAP_PRIVATE = 0x0002;
const MAP_JIT = 0x0800;
const MAP_ANON = 0x1000;
const MAP_FAILED = 2n ** 64n - 1n;
const VM_FLAGS_FIXED = 0;
const VM_FLAGS_ANYWHERE = 1;
const VM_INHERIT_NONE = 2;
/** `vm_region_submap_info_64`: 19 `natural_t`s (`VM_REGION_SUBMAP_INFO_COUNT_64`). */
const SUBMAP_INFO_COUNT = 19;
const SUBMAP_INFO_IS_SUBMAP = 48;

const KERN_NAMES: Record<number, string> = {
  1: "KERN_INVALID_ADDRESS",
  2: "KERN_PROTECTION_FAILURE",
  3: "KERN_NO_SPACE",
  4: "KERN_INVALID_ARGUMENT",
  5: "KERN_FAILURE",
  6: "KERN_RESOURCE_SHORTAGE",
  8: "KERN_NO_ACCESS",
};
/** macOS's number for ENOSYS (Linux: 38); the others posix.ts knows. */
const ERRNO_NAMES: Record<number, string> = { 78: "ENOSYS" };

/** What the user can do when macOS refuses to let code be written or run again. */
const HARDENED_RUNTIME_ADVICE = "This is what macOS does for a process with the hardened runtime (code signing " +
  "enforcement: Deno and Bun as released are signed with it). Run a copy of the runtime re-signed " +
  "without it (`cp $(which deno) ./deno && codesign --force --sign - ./deno`), or signed with the " +
  "entitlement com.apple.security.cs.disable-executable-page-protection; or redefine a function of " +
  "a library you built and loaded yourself.";

function libSystem(runtime: Runtime) {
  return runtime.open(LIBSYSTEM, {
    sysconf: { parameters: ["i32"], result: "i64" },
    mprotect: { parameters: ["usize", "usize", "i32"], result: "i32" },
    mmap: { parameters: ["usize", "usize", "i32", "i32", "i32", "i64"], result: "usize" },
    munmap: { parameters: ["usize", "usize"], result: "i32" },
    __error: { parameters: [], result: "usize" },
    strerror: { parameters: ["i32"], result: "usize" },
    getpid: { parameters: [], result: "i32" },
    dlopen: { parameters: ["buffer", "i32"], result: "usize" },
    dlerror: { parameters: [], result: "usize" },
    dlsym: { parameters: ["usize", "buffer"], result: "usize" },
    dladdr: { parameters: ["usize", "buffer"], result: "i32" },
    sys_icache_invalidate: { parameters: ["usize", "usize"], result: "void" },
    mach_task_self: { parameters: [], result: "u32" },
    mach_vm_protect: { parameters: ["u32", "u64", "u64", "i32", "i32"], result: "i32" },
    mach_vm_allocate: { parameters: ["u32", "buffer", "u64", "i32"], result: "i32" },
    mach_vm_deallocate: { parameters: ["u32", "u64", "u64"], result: "i32" },
    mach_vm_remap: {
      // target task, *target address, size, mask, flags, source task, source address, copy,
      // *current protection, *maximum protection, inheritance
      parameters: ["u32", "buffer", "u64", "u64", "i32", "u32", "u64", "i32", "buffer", "buffer", "u32"],
      result: "i32",
    },
    mach_vm_region_recurse: {
      // task, *address, *size, *depth, info, *info count
      parameters: ["u32", "buffer", "buffer", "buffer", "buffer", "buffer"],
      result: "i32",
    },
    proc_regionfilename: { parameters: ["i32", "u64", "buffer", "u32"], result: "i32" },
  });
}

function kernText(code: number): string {
  return `${KERN_NAMES[code] ?? "kern_return_t"} (${code})`;
}

/** A region as `mach_vm_region_recurse` reports it. */
interface Region {
  readonly start: bigint;
  readonly end: bigint;
  readonly protection: number;
  readonly isSubmap: boolean;
  readonly depth: number;
}

/** The macOS layer over `runtime`. */
export function darwin(runtime: Runtime): Os {
  const c = libSystem(runtime);
  const arm64 = runtime.arch === "aarch64" || runtime.arch === "arm64";
  const pageSize = Number(c.sysconf(SC_PAGESIZE));
  const task = c.mach_task_self() as number;
  const pid = c.getpid() as number;
  const page = BigInt(pageSize);

  const u32 = (bytes: Uint8Array, at = 0) => new DataView(bytes.buffer, bytes.byteOffset).getUint32(at, true);

  const { errnoText, symbolAddress } = posix(runtime, c, {
    errnoAddress: () => c.__error() as bigint,
    errnoNames: ERRNO_NAMES,
    rtldDefault: RTLD_DEFAULT,
    libraryAdvice: `Give the install name or path the dynamic loader knows (e.g. "${LIBSYSTEM}", ` +
      `"/usr/lib/libz.1.dylib").`,
    // dlsym takes the C name and adds the leading underscore itself.
    spelling: "the C name, without the leading underscore",
  });

  /** The first region at or above `address`, looking `depth` submaps deep; null past the last. */
  function region(address: bigint, depth: number): Region | null {
    const at = new BigUint64Array([address]);
    const size = new BigUint64Array(1);
    const depthIn = new Uint32Array([depth]);
    const info = new Uint8Array(SUBMAP_INFO_COUNT * 4);
    const count = new Uint32Array([SUBMAP_INFO_COUNT]);
    const bytes = (a: BigUint64Array | Uint32Array) => new Uint8Array(a.buffer);
    const kr = c.mach_vm_region_recurse(task, bytes(at), bytes(size), bytes(depthIn), info, bytes(count)) as number;
    if (kr !== 0) return null;
    return {
      start: at[0]!,
      end: at[0]! + size[0]!,
      protection: u32(info, 0) & (PROT_READ | PROT_WRITE | PROT_EXEC),
      isSubmap: u32(info, SUBMAP_INFO_IS_SUBMAP) !== 0,
      depth: depthIn[0]!,
    };
  }

  function regionPath(address: bigint): string {
    const buffer = new Uint8Array(1024);
    const n = c.proc_regionfilename(pid, address, buffer, buffer.length) as number;
    return n > 0 ? new TextDecoder().decode(buffer.subarray(0, n)) : "";
  }

  function mappingAt(address: bigint): Mapping | null {
    for (let depth = 0;;) {
      const r = region(address, depth);
      if (!r || r.start > address) return null;
      if (!r.isSubmap) return { start: r.start, end: r.end, protection: r.protection, path: "" };
      depth = r.depth + 1;
    }
  }

  function mappings(): Mapping[] {
    const found: Mapping[] = [];
    let address = 0n;
    for (let depth = 0;;) {
      const r = region(address, depth);
      if (!r) return found;
      if (r.isSubmap) {
        depth = r.depth + 1;
        address = r.start;
        continue;
      }
      found.push({ start: r.start, end: r.end, protection: r.protection, path: regionPath(r.start) });
      depth = r.depth;
      address = r.end;
    }
  }

  function machProtect(start: bigint, length: number, protection: number): number {
    return c.mach_vm_protect(task, start, BigInt(length), 0, protection) as number;
  }

  function deallocate(address: bigint, size: bigint): void {
    c.mach_vm_deallocate(task, address, size);
  }

  const images = darwinImages(runtime, c, pageSize, mappingAt);

  const os: Os = {
    pageSize,

    symbolAddress,
    ...images,

    mappings,
    mappingAt,

    protect(start, length, protection) {
      if (protection & PROT_WRITE) {
        // VM_PROT_COPY: a private copy of shared text (the shared cache, signed images), which
        // plain mprotect refuses to make writable.
        const wanted = arm64 ? protection & ~PROT_EXEC : protection;
        let kr = machProtect(start, length, wanted | VM_PROT_COPY);
        if (kr !== 0 && wanted & PROT_EXEC) kr = machProtect(start, length, (wanted & ~PROT_EXEC) | VM_PROT_COPY);
        if (kr !== 0) {
          throw new RedefineError(
            "PROTECT_FAILED",
            `mach_vm_protect(${hex(start)}, ${length}, ${protectionText(wanted)} | VM_PROT_COPY) failed: ` +
              `${kernText(kr)}: macOS will not make this code writable. ${HARDENED_RUNTIME_ADVICE}`,
          );
        }
        return;
      }
      if ((c.mprotect(start, BigInt(length), protection) as number) !== 0) {
        const why = errnoText();
        throw new RedefineError(
          "PROTECT_FAILED",
          `mprotect(${hex(start)}, ${length}, ${protectionText(protection)}) failed: ${why}.` +
            (protection & PROT_EXEC
              ? ` macOS will not let modified code run again. ${HARDENED_RUNTIME_ADVICE}`
              : ""),
        );
      }
    },

    allocateCode(near, reach, size, wanted = pageSize) {
      const dataSize = Math.max(1, Math.ceil(wanted / pageSize)) * pageSize;
      const total = BigInt(size + dataSize);
      const candidates = nearCandidates(mappings(), near, reach, total, page).slice(0, 16);
      let refused = false;
      for (const at of candidates) {
        const where = new BigUint64Array([at]);
        if ((c.mach_vm_allocate(task, new Uint8Array(where.buffer), total, VM_FLAGS_FIXED) as number) !== 0) continue;
        // The write alias: the same pages (copy = false), anywhere.
        const alias = new BigUint64Array(1);
        const current = new Uint32Array(1), maximum = new Uint32Array(1);
        const kr = c.mach_vm_remap(
          task, new Uint8Array(alias.buffer), BigInt(size), 0n, VM_FLAGS_ANYWHERE, task, at, 0,
          new Uint8Array(current.buffer), new Uint8Array(maximum.buffer), VM_INHERIT_NONE,
        ) as number;
        if (kr !== 0) {
          deallocate(at, total);
          throw new RedefineError("ALLOCATION_FAILED", `mach_vm_remap of a code block failed: ${kernText(kr)}.`);
        }
        // The code half runs read+execute; the data after it stays read+write.
        if (machProtect(at, size, PROT_READ | PROT_EXEC) === 0) {
          return { address: at, writable: alias[0]!, size, data: at + BigInt(size), dataSize };
        }
        deallocate(alias[0]!, BigInt(size));
        deallocate(at, total);
        refused = true; // executable anonymous memory is refused (hardened runtime): not here either
        break;
      }
      // A hardened x86-64 runtime with com.apple.security.cs.allow-jit may still map MAP_JIT memory,
      // writable and executable at once (x86-64 has no per-thread JIT write protection): the block
      // is then its own write alias. On arm64 that memory would need pthread_jit_write_protect_np
      // around each write, which a write from JS cannot have (see the module doc): no block.
      if (refused && !arm64) {
        for (const at of candidates) {
          const address = c.mmap(at, total, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANON | MAP_JIT, -1, 0n) as bigint;
          if (address === MAP_FAILED) return null;
          if (address === at) return { address, writable: address, size, data: at + BigInt(size), dataSize };
          c.munmap(address, total);
        }
      }
      return null;
    },

    loadableImage() {
      throw new RedefineError(
        "UNSUPPORTED_PLATFORM",
        "calling the original at full speed needs a stub library the runtime can dlopen; on macOS that " +
          "is a Mach-O dylib (ad-hoc signed on arm64), which redefine does not build yet. Call the " +
          "trampoline through the runtime's function-pointer call instead.",
      );
    },

    // mach_vm_write into this task would be the counterpart of Linux's /proc/self/mem; until it is
    // measured against VM_PROT_COPY, every write makes its pages writable first.
    forceWrite() {
      return false;
    },

    flushCode(address, length) {
      c.sys_icache_invalidate(address, BigInt(length));
    },

  };
  return os;
}
