/**
 * Linux memory services through glibc, called with the runtime's FFI: page size, protections
 * (`mprotect`, read back from /proc/self/maps), writes into code without them (/proc/self/mem,
 * platform/proc_mem.ts; x86-64), symbols (`dlsym`, `dladdr1`), executable memory near a target (a
 * memfd mapped twice: read+execute where the code runs, read+write elsewhere to write it, so no
 * page of ours is ever writable and executable), stub libraries for the loader (a sealed memfd),
 * and the arm64 cache flush. Modules, exports and imports: platform/linux_modules.ts.
 */
import { hex, RedefineError } from "../src/errors.ts";
import type { CodeBlock, Mapping, Os, Runtime, Store, SymbolInfo } from "./types.ts";
import { ANYWHERE, PROT_EXEC, PROT_READ, PROT_WRITE, sameFile } from "./types.ts";
import { aarch64CacheFlush } from "./aarch64_flush.ts";
import { aarch64BranchChecks } from "./branch_checks.ts";
import { farPlace, nearCandidates, protectionText } from "./address_space.ts";
import { cString, posix } from "./posix.ts";
import { lazyLibrary } from "./lazy_library.ts";
import { procMem } from "./proc_mem.ts";
import { storesInOrder } from "./stores_in_order.ts";
import { linuxModules, mappedReader } from "./linux_modules.ts";

const RTLD_DL_SYMENT = 1;
const SC_PAGESIZE = 30;
const MAP_SHARED = 0x01;
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const MAP_FIXED_NOREPLACE = 0x100000;
const MAP_FAILED = 2n ** 64n - 1n;
const MFD_CLOEXEC = 1;
const MFD_ALLOW_SEALING = 2;
const MFD_EXEC = 0x10;
const F_ADD_SEALS = 1033;
/** No more seals, no shrinking, no growing, no writing: the file's bytes are fixed for good. */
const SEALED = 0x1 | 0x2 | 0x4 | 0x8;
const O_RDONLY = 0;
const O_CLOEXEC = 0x80000;
/** `_IOWR('f', 17, struct procmap_query)`: one mapping by address, Linux 6.11 and later. */
const PROCMAP_QUERY = 0xc0686611n;
const PROCMAP_QUERY_SIZE = 104;
const ENOENT = 2;
/**
 * How far from the C library a block for code that may live anywhere may be (`blockBesideLibc`):
 * all of libc's text stays within a near jump's ±2 GiB of all of it.
 */
const BESIDE_LIBC = 2n ** 31n - 2n ** 25n;
const PROT_NONE = 0;
const MAP_FIXED = 0x10;
/** Linux's number for ENOSYS (macOS: 78); the others posix.ts knows. */
const ERRNO_NAMES: Record<number, string> = { 38: "ENOSYS" };

/**
 * What a process calls only a few times (once, once per code block, on a failure), called through
 * its address where binding costs more (platform/lazy_library.ts): a first patch binds only what
 * every patch calls.
 */
const SELDOM = [
  "sysconf", "mmap", "munmap", "memfd_create", "ftruncate", "open", "close", "read", "__errno_location", "strerror",
  "write", "fcntl", "dlopen", "dlerror",
] as const;

/** What a seldom symbol is looked up with, so is found anywhere in the process: as a C program finds it. */
const DLFCN = new Set(["dlopen", "dlerror"]);

/** What each patch calls once or twice (a mapping query, a forced write, a symbol's size): bound once busy. */
const BUSY_LATER = ["ioctl", "pwrite", "dladdr1"] as const;

/**
 * libc's functions, in groups bound on first use (platform/lazy_library.ts); `address` finds a
 * seldom one in libc; `defer` takes a busy-later one's binding.
 */
function libc(runtime: Runtime, address: (symbol: string) => bigint, defer: (bind: () => void) => void) {
  return lazyLibrary(runtime, "libc.so.6", {
    // What a first patch calls: mapping queries, code blocks, forced writes, symbols.
    firstPatch: {
      mmap: { parameters: ["usize", "usize", "i32", "i32", "i32", "i64"], result: "usize" },
      munmap: { parameters: ["usize", "usize"], result: "i32" },
      memfd_create: { parameters: ["buffer", "u32"], result: "i32" },
      ftruncate: { parameters: ["i32", "i64"], result: "i32" },
      open: { parameters: ["buffer", "i32"], result: "i32" },
      pwrite: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize" },
      close: { parameters: ["i32"], result: "i32" },
      ioctl: { parameters: ["i32", "u64", "usize"], result: "i32" },
      dlsym: { parameters: ["usize", "buffer"], result: "usize" },
      dladdr1: { parameters: ["usize", "buffer", "buffer", "i32"], result: "i32" },
    },
    // The page size: x86-64's is always 4 KiB.
    pageSize: {
      sysconf: { parameters: ["i32"], result: "i64" },
    },
    // The whole map as text, which a first patch on x86-64 does not read.
    mapText: {
      read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
    },
    protections: {
      mprotect: { parameters: ["usize", "usize", "i32"], result: "i32" },
    },
    errors: {
      __errno_location: { parameters: [], result: "usize" },
      strerror: { parameters: ["i32"], result: "usize" },
    },
    libraries: {
      dlopen: { parameters: ["buffer", "i32"], result: "usize" },
      dlerror: { parameters: [], result: "usize" },
    },
    stubLibraries: {
      write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
      fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
    },
    // arm64's Guarded Control Stack, asked of a CPU that has one (platform/branch_checks.ts).
    shadowStack: {
      prctl: { parameters: ["i32", "buffer", "u64", "u64", "u64"], result: "i32" },
    },
    // The auxiliary vector, alone: a first JS replacement asks it for the program's headers (the
    // guard's runtime code), an arm64 patch for the CPU's BTI and GCS bits; module lists for the vDSO.
    auxiliaryVector: {
      getauxval: { parameters: ["u64"], result: "u64" },
    },
    modules: {
      dlvsym: { parameters: ["usize", "buffer", "buffer"], result: "usize" },
      dlclose: { parameters: ["usize"], result: "i32" },
      dl_iterate_phdr: { parameters: ["function", "pointer"], result: "i32" },
      readlink: { parameters: ["buffer", "buffer", "usize"], result: "isize" },
    },
  }, { names: SELDOM, busyLater: BUSY_LATER, defer, address });
}

/** Parses /proc/self/maps text. */
export function parseMaps(text: string): Mapping[] {
  const mappings: Mapping[] = [];
  for (const line of text.split("\n")) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) (r|-)(w|-)(x|-)\S* ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)\s*(.*)$/.exec(line);
    if (!m) continue;
    const start = BigInt("0x" + m[1]);
    const inode = Number(m[9]);
    mappings.push({
      start,
      end: BigInt("0x" + m[2]),
      protection: (m[3] === "r" ? PROT_READ : 0) | (m[4] === "w" ? PROT_WRITE : 0) |
        (m[5] === "x" ? PROT_EXEC : 0),
      path: m[10]!,
      file: inode === 0 ? undefined : {
        device: device(parseInt(m[7]!, 16), parseInt(m[8]!, 16)),
        inode,
        base: start - BigInt("0x" + m[6]),
      },
    });
  }
  return mappings;
}

/**
 * Whether the PROCMAP_QUERY answer in `fields` (its flags and inode read) says exactly what `was`
 * says, word by word: no Mapping made. Offsets as in `queryMapping`.
 */
function sameAnswer(fields: DataView, flags: number, inode: number, was: Mapping): boolean {
  if ((flags & (PROT_READ | PROT_WRITE | PROT_EXEC)) !== was.protection || was.path !== "") return false;
  if (!sameWord(fields, 24, was.start) || !sameWord(fields, 32, was.end)) return false;
  const file = was.file;
  if (inode === 0 || file === undefined) return inode === 0 && file === undefined;
  return file.inode === inode && file.device === device(fields.getUint32(72, true), fields.getUint32(76, true)) &&
    sameWord(fields, 56, was.start, file.base);
}

/**
 * Whether the 64-bit word at `offset` of `fields` is `value` (less `minus`). As bigints: split into
 * numbers (exact below 2^53) the comparison measured slower under Node.
 */
function sameWord(fields: DataView, offset: number, value: bigint, minus = 0n): boolean {
  return fields.getBigUint64(offset, true) === (minus === 0n ? value : value - minus);
}

/** Whether two mappings say exactly the same, field by field. */
function sameListing(a: Mapping, b: Mapping): boolean {
  return a.start === b.start && a.end === b.end && a.protection === b.protection && a.path === b.path &&
    (a.file === undefined ? b.file === undefined : b.file !== undefined && sameFile(a.file, b.file));
}

/** A device number from its major and minor numbers, as the kernel composes them. */
function device(major: number, minor: number): number {
  return major * 0x100000 + minor;
}

/** The Linux layer over `runtime`. */
export function linux(runtime: Runtime): Os {
  // Bindings of busy-later symbols, put off until `runDeferred`: the call that proves one busy may
  // be a forced write in the middle of a patch's stores.
  const due: (() => void)[] = [];
  // libc's own definitions, by its handle (the runtime's executable may define some too: Deno's
  // has a memfd_create), but for the calls that open that handle.
  const c = libc(
    runtime,
    (symbol) => symbolAddress(symbol, DLFCN.has(symbol) ? undefined : "libc.so.6"),
    (bind) => due.push(bind),
  );
  // x86-64 keeps instruction fetch coherent with stores by itself; arm64 needs a flush.
  const arm64 = runtime.arch === "aarch64" || runtime.arch === "arm64";

  const { errno, errnoText, symbolAddress } = posix(runtime, c, {
    errnoAddress: () => c.__errno_location() as bigint,
    errnoNames: ERRNO_NAMES,
    rtldDefault: 0n,
    libraryAdvice: `Give the name the dynamic loader knows (e.g. "libc.so.6", "libm.so.6") or an absolute path.`,
    spelling: "C names, no mangling",
  });
  // arm64 kernels are built for 4, 16 or 64 KiB pages; x86-64 has 4 KiB pages only.
  const pageSize = arm64 ? Number(c.sysconf(SC_PAGESIZE)) : 4096;
  const flush = arm64 ? aarch64CacheFlush(runtime, pageSize).flush : null;

  // Forced writes on x86-64 only, and there only where mprotect is refused (`protectFrom` below):
  // threads running the code may see the kernel's copy torn (README: Not guaranteed). On arm64
  // they are unmeasured, and under qemu-user, where the arm64 suite runs, a write behind qemu's
  // back would leave its translated code stale.
  const forced = arm64 ? null : procMem(runtime, c, pageSize, (code) => errnoText(code));
  // The routine for several stores in one call, in a code block of its own, written through the
  // block's writable alias and flushed like any code of the pool.
  const inOrder = storesInOrder(runtime, (code) => {
    const block = os.allocateCode(0n, ANYWHERE, pageSize);
    if (!block) throw new RedefineError("ALLOCATION_FAILED", "no executable memory for the routine that writes entries in several stores.");
    runtime.view(block.writable, code.length).set(code);
    flush?.(block.address, code.length);
    return block.address;
  });

  // One open /proc/self/maps answers PROCMAP_QUERY for the life of the process; null once the
  // kernel turns out not to know the ioctl (or no page for its struct could be had), and we read
  // the whole text instead.
  let queryFd: number | null = c.open(cString("/proc/self/maps"), O_RDONLY | O_CLOEXEC) as number;
  // The query's struct, in a page of its own made on the first query, is passed by its address:
  // node:ffi finds a buffer argument's address on every call, 0.15–0.25 µs of a 0.5–0.9 µs query
  // (Deno and Bun pass either as fast).
  let query = 0n;
  let queryFields: DataView | null = null;

  /**
   * The mapping containing `address` by PROCMAP_QUERY; undefined when the kernel cannot tell. `was`
   * (see `Os.mappingAt`) comes back when every field is the same.
   */
  function queryMapping(address: bigint, was: Mapping | undefined): Mapping | null | undefined {
    if (queryFd === null || queryFd < 0) return undefined;
    if (queryFields === null) {
      const at = c.mmap(0n, BigInt(pageSize), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0n) as bigint;
      if (at === MAP_FAILED) {
        queryFd = null;
        return undefined;
      }
      const view = runtime.view(at, PROCMAP_QUERY_SIZE);
      query = at;
      queryFields = new DataView(view.buffer, view.byteOffset, PROCMAP_QUERY_SIZE);
      queryFields.setBigUint64(0, BigInt(PROCMAP_QUERY_SIZE), true);
    }
    // query_flags stays 0 (the covering mapping) and no name or build id is asked for, so only
    // query_addr changes between calls.
    queryFields.setBigUint64(16, address, true);
    if ((c.ioctl(queryFd, PROCMAP_QUERY, query) as number) !== 0) {
      const code = errno();
      if (code === ENOENT) return null;
      queryFd = null;
      return undefined;
    }
    // Read as numbers where a number holds them (the flags' low word; the inode, below 2^53 on any
    // file system): a bigint read is a heap object, and a patch makes about one query.
    const flags = queryFields.getUint32(40, true);
    // struct procmap_query: vma_offset at 56, inode at 64, dev_major and dev_minor at 72 and 76.
    const inode = queryFields.getUint32(64, true) + queryFields.getUint32(68, true) * 2 ** 32;
    if (was !== undefined && sameAnswer(queryFields, flags, inode, was)) return was;
    const start = queryFields.getBigUint64(24, true);
    return {
      start,
      end: queryFields.getBigUint64(32, true),
      protection: flags & (PROT_READ | PROT_WRITE | PROT_EXEC),
      path: "",
      file: inode === 0 ? undefined : {
        device: device(queryFields.getUint32(72, true), queryFields.getUint32(76, true)),
        inode,
        base: start - queryFields.getBigUint64(56, true),
      },
    };
  }

  function readMaps(): string {
    const fd = c.open(cString("/proc/self/maps"), O_RDONLY) as number;
    if (fd < 0) throw new RedefineError("INVALID_ADDRESS", `cannot read /proc/self/maps: ${errnoText()}`);
    const chunks: Uint8Array[] = [];
    const buffer = new Uint8Array(65536);
    try {
      for (;;) {
        const n = Number(c.read(fd, buffer, BigInt(buffer.length)));
        if (n <= 0) break;
        chunks.push(buffer.slice(0, n));
      }
    } finally {
      c.close(fd);
    }
    const all = new Uint8Array(chunks.reduce((n, chunk) => n + chunk.length, 0));
    chunks.reduce((at, chunk) => (all.set(chunk, at), at + chunk.length), 0);
    return new TextDecoder().decode(all);
  }

  function mapShared(fd: number, at: bigint, size: number, protection: number, flags: number): bigint | null {
    const address = c.mmap(at, BigInt(size), protection, MAP_SHARED | flags, fd, 0n) as bigint;
    if (address === MAP_FAILED) return null;
    // Kernels before 4.17 take MAP_FIXED_NOREPLACE as a mere hint: a different address is a miss.
    if (at !== 0n && address !== at) {
      c.munmap(address, BigInt(size));
      return null;
    }
    return address;
  }

  function codeFile(size: number, label = "redefine-code", flags = 0): number {
    const name = cString(label);
    let fd = c.memfd_create(name, MFD_CLOEXEC | MFD_EXEC | flags) as number;
    if (fd < 0) fd = c.memfd_create(name, MFD_CLOEXEC | flags) as number; // kernels before 6.3 lack MFD_EXEC
    if (fd < 0) {
      throw new RedefineError("ALLOCATION_FAILED", `memfd_create failed: ${errnoText()}.`);
    }
    if ((c.ftruncate(fd, BigInt(size)) as number) !== 0) {
      const why = errnoText();
      c.close(fd);
      throw new RedefineError("ALLOCATION_FAILED", `ftruncate of the code file failed: ${why}.`);
    }
    return fd;
  }


  /**
   * Whether a request leaves the place to us: any address at all. On x86-64, whose near jumps reach
   * ±2 GiB, such code goes beside the C library (`blockBesideLibc`); on arm64 near space is
   * ±128 MiB and scarce, and such code keeps to the lowest free gap.
   */
  const anywhere = (near: bigint, reach: bigint) => !arm64 && near === 0n && reach >= ANYWHERE;

  /**
   * A block for code that may live anywhere, where the system puts a mapping asked for at the C
   * library: where it puts libraries, in practice within a GiB of it. There the block also holds
   * the trampolines of the libc functions a first patch redefines, and placing it needs no read of
   * the map: a first patch then makes one block, not two, and reads the map not at all (the first
   * read and parse of it costs 0.3-0.7 ms). Null when the system put it out of reach.
   */
  function blockBesideLibc(fd: number, size: number, dataSize: number): CodeBlock | null {
    const anchor = c.dlsym(0n, cString("gnu_get_libc_version")) as bigint; // glibc's alone
    if (anchor === 0n) return null;
    const total = BigInt(size + dataSize);
    // Code and data are one reservation first, then each mapped over its part: contiguous for sure.
    const at = c.mmap(anchor, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0n) as bigint;
    if (at === MAP_FAILED) return null;
    const code = (at > anchor ? at - anchor : anchor - at) < BESIDE_LIBC
      ? c.mmap(at, BigInt(size), PROT_READ | PROT_EXEC, MAP_SHARED | MAP_FIXED, fd, 0n) as bigint
      : MAP_FAILED;
    const data = code === at
      ? c.mmap(at + BigInt(size), BigInt(dataSize), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0n) as bigint
      : MAP_FAILED;
    // The write alias wherever the system likes: x86-64's near space is plentiful.
    const writable = data === at + BigInt(size) ? mapShared(fd, 0n, size, PROT_READ | PROT_WRITE, 0) : null;
    if (writable === null) {
      c.munmap(at, total);
      return null;
    }
    return { address: at, writable, size, data, dataSize };
  }

  const modules = linuxModules(runtime, c, pageSize, () => parseMaps(readMaps()));
  const bti = arm64
    ? aarch64BranchChecks(runtime, c, pageSize, () => mappedReader(runtime, (address) => os.mappingAt(address)))
    : null;

  const os: Os = {
    pageSize,

    symbolAddress,

    symbolAt(address) {
      const info = new Uint8Array(32);
      const extra = new Uint8Array(8);
      if ((c.dladdr1(address, info, extra, RTLD_DL_SYMENT) as number) === 0) return null;
      const fields = new DataView(info.buffer);
      const fileName = fields.getBigUint64(0, true);
      const symbolName = fields.getBigUint64(16, true);
      const symbolAddress = fields.getBigUint64(24, true);
      const entry = new DataView(extra.buffer).getBigUint64(0, true);
      if (symbolName === 0n || entry === 0n) return null;
      // Elf64_Sym: st_name u32, st_info u8, st_other u8, st_shndx u16, st_value u64, st_size u64.
      const size = new DataView(runtime.view(entry + 16n, 8).slice().buffer).getBigUint64(0, true);
      return {
        name: runtime.cString(symbolName),
        start: symbolAddress,
        size: Number(size),
        library: fileName === 0n ? "" : runtime.cString(fileName),
      } satisfies SymbolInfo;
    },

    mappings() {
      return parseMaps(readMaps());
    },

    mappingAt(address, was) {
      const found = queryMapping(address, was);
      if (found !== undefined) return found;
      const listed = parseMaps(readMaps()).find((m) => address >= m.start && address < m.end) ?? null;
      return was !== undefined && listed !== null && sameListing(listed, was) ? was : listed;
    },

    protect(start, length, protection) {
      if ((c.mprotect(start, BigInt(length), bti?.protection(start, protection) ?? protection) as number) !== 0) {
        const why = errnoText();
        const refusal = forced?.refusal();
        throw new RedefineError(
          "PROTECT_FAILED",
          `mprotect(${hex(start)}, ${length}, ${protectionText(protection)}) failed: ${why}` +
            (refusal ? `, and ${refusal}` : "") +
            (protection & PROT_WRITE
              ? `. The kernel will not let this process change this code; to change what given ` +
                `libraries see, redefine only their calls with { callers } (their import slots are data).`
              : "."),
        );
      }
    },

    // Every store into code the protection way: forced writes are not one store under threads
    // running the code (see `Os.protectFrom`).
    protectFrom: 1,

    forceWrite(address, bytes) {
      return forced?.write(address, bytes) ?? false;
    },

    storeInOrder(stores: readonly Store[], force: boolean) {
      if (!force) return inOrder(stores, -1).made;
      return forced ? forced.writeInOrder(stores, inOrder) : 0;
    },

    allocateCode(near, reach, size, wanted = pageSize) {
      const fd = codeFile(size);
      const dataSize = Math.max(1, Math.ceil(wanted / pageSize)) * pageSize;
      try {
        const beside = anywhere(near, reach) ? blockBesideLibc(fd, size, dataSize) : null;
        if (beside) return beside;
        const total = BigInt(size + dataSize);
        const mappings = parseMaps(readMaps());
        for (const at of nearCandidates(mappings, near, reach, total, BigInt(pageSize), 256)) {
          const address = mapShared(fd, at, size, PROT_READ | PROT_EXEC, MAP_FIXED_NOREPLACE);
          if (address === null) continue;
          // The guard stubs' flags and saved return addresses, right after the code so that
          // rip-relative operands reach them.
          const data = c.mmap(at + BigInt(size), BigInt(dataSize), PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0n) as bigint;
          if (data !== at + BigInt(size)) {
            if (data !== MAP_FAILED) c.munmap(data, BigInt(dataSize));
            c.munmap(address, BigInt(size));
            continue;
          }
          // The write alias needs no reach: far away, it leaves the near gaps to code. The map read
          // above, with the block just mapped, tells where (one read and parse of the map is most
          // of a block's cost): a place taken meanwhile fails MAP_FIXED_NOREPLACE, and the system
          // chooses instead.
          const below = mappings.findIndex((m) => m.start > address);
          mappings.splice(below < 0 ? mappings.length : below, 0, { start: address, end: address + total, protection: 0, path: "" });
          const far = farPlace(mappings, BigInt(size), BigInt(pageSize));
          const writable = (far === 0n ? null : mapShared(fd, far, size, PROT_READ | PROT_WRITE, MAP_FIXED_NOREPLACE)) ??
            mapShared(fd, 0n, size, PROT_READ | PROT_WRITE, 0);
          if (writable === null) {
            c.munmap(address, total);
            throw new RedefineError("ALLOCATION_FAILED", `mmap of the code file failed: ${errnoText()}.`);
          }
          return { address, writable, size, data, dataSize };
        }
        return null;
      } finally {
        // The mappings keep the file; without a descriptor, our write alias is its only writable path.
        c.close(fd);
      }
    },

    loadableImage(image) {
      const fd = codeFile(image.length, "redefine-stubs", MFD_ALLOW_SEALING);
      const fail = (what: string): never => {
        const why = errnoText();
        c.close(fd);
        throw new RedefineError("ALLOCATION_FAILED", `${what} the stub library failed: ${why}.`);
      };
      for (let done = 0; done < image.length;) {
        const n = Number(c.write(fd, image.subarray(done), BigInt(image.length - done)));
        if (n <= 0) fail("writing");
        done += n;
      }
      // The descriptor stays open, since the loader finds the library again by this path, so the
      // file is sealed: no one can write code the process runs through /proc/self/fd/N.
      if ((c.fcntl(fd, F_ADD_SEALS, SEALED) as number) !== 0) fail("sealing");
      return `/proc/self/fd/${fd}`;
    },

    ...modules,

    ...(bti ? { branchChecks: bti.branchChecks } : {}),

    flushCode(address, length) {
      flush?.(address, length);
    },

    runDeferred() {
      for (let bind = due.shift(); bind; bind = due.shift()) bind();
    },
  };
  return os;
}
