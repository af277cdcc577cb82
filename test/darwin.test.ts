/**
 * The macOS layer against a fake libSystem (no Mac here): every foreign call it makes is recorded,
 * so these tests pin the exact protections, flush ranges and call order it would use on a Mac.
 */
import { assert, assertCode, test } from "./harness.ts";
import { darwin, decodeFunctionStarts, LIBSYSTEM } from "../platform/darwin.ts";
import { osFor, sameMemory } from "../platform/mod.ts";
import { PROTECT_FROM, writeCode } from "../src/code_memory.ts";
import { fakeRuntime, fields } from "./fake_ffi.ts";
import type { FakeRuntime } from "./fake_ffi.ts";

const R = 1, W = 2, X = 4, COPY = 0x10;
const TASK = 0x203;
const PID = 4321;
const KERN_PROTECTION_FAILURE = 2;
const KERN_NO_SPACE = 3;
const EACCES = 13;

/** One entry of the fake task's address space; `submap` entries hold nested ones (the shared region). */
interface Entry {
  start: bigint;
  end: bigint;
  protection: number;
  maxProtection: number;
  path?: string;
  /** Shared text of a signed image: writable only as a private copy (VM_PROT_COPY). */
  sharedText?: boolean;
  submap?: Entry[];
}

interface Kernel {
  runtime: FakeRuntime;
  entries: Entry[];
  /** Addresses given out by mach_vm_remap, in order. */
  aliases: bigint[];
  policy: { refuseWrite: boolean; refuseWriteExecute: boolean; refuseExecOfAnonymous: boolean; refuseMprotect: boolean };
}

const ERRNO_AT = 0x6000_0000n;
const STRINGS_AT = 0x6000_1000n;
const LIBRARY_HANDLE = 0x7000n;
const IMAGE = 0x1_9000_0000n; // the fake libsystem_c's mach header
const SLIDE = 0x9000_0000n; // its load address minus its link-time __TEXT vmaddr

/** A fake macOS: an address space of `Entry`s, a fake dyld, a fake libSystem over both. */
function fakeMac(arch: "aarch64" | "x86_64", entries: Entry[] = []): Kernel {
  const policy = { refuseWrite: false, refuseWriteExecute: false, refuseExecOfAnonymous: false, refuseMprotect: false };
  const aliases: bigint[] = [];
  const pageSize = arch === "aarch64" ? 16384 : 4096;
  const strings = new Map<string, bigint>();
  let nextString = STRINGS_AT;
  let nextAlias = 0x3_0000_0000n;
  const kernel = { entries, aliases, policy } as Kernel;

  const flat = (list: Entry[]): Entry[] => list.flatMap((e) => (e.submap ? flat(e.submap) : [e]));
  const overlaps = (start: bigint, end: bigint) => flat(entries).some((e) => e.start < end && start < e.end);
  const entryAt = (address: bigint) => flat(entries).find((e) => address >= e.start && address < e.end);
  /** mach_vm_region_recurse: the first entry ending above `address`, entering submaps `depth` deep. */
  const lookup = (list: Entry[], address: bigint, depth: number, level: number): [Entry, number] | null => {
    for (const e of [...list].sort((a, b) => (a.start < b.start ? -1 : 1))) {
      if (e.end <= address) continue;
      if (e.submap && level < depth) {
        const inner = lookup(e.submap, address > e.start ? address : e.start, depth, level + 1);
        if (inner) return inner;
        continue;
      }
      return [e, level];
    }
    return null;
  };
  const cstring = (bytes: Uint8Array) => new TextDecoder().decode(bytes.subarray(0, bytes.indexOf(0)));
  const stringAt = (text: string) => {
    if (!strings.has(text)) {
      runtime.memory.writeCString(nextString, text);
      strings.set(text, nextString);
      nextString += BigInt(text.length + 1);
    }
    return strings.get(text)!;
  };
  let errno = 0;

  const runtime = fakeRuntime({
    os: "darwin",
    arch,
    functions: {
      sysconf: (name: number) => (name === 29 ? pageSize : -1),
      mach_task_self: () => TASK,
      getpid: () => PID,
      __error: () => {
        fields(runtime.memory.view(ERRNO_AT, 4)).setInt32(0, errno, true);
        return ERRNO_AT;
      },
      strerror: (code: number) => stringAt(code === EACCES ? "Permission denied" : `error ${code}`),
      dlopen: (name: Uint8Array) => (cstring(name) === "/usr/lib/libz.1.dylib" ? LIBRARY_HANDLE : 0n),
      dlerror: () => stringAt("dlopen(nope.dylib, 0x0001): tried: 'nope.dylib' (no such file)"),
      dlsym: (handle: bigint, name: Uint8Array) => {
        const symbols: Record<string, bigint> = { getpid: IMAGE + 0x1040n, labs: IMAGE + 0x10a0n };
        if (handle === LIBRARY_HANDLE) return cstring(name) === "deflate" ? 0x1_a000_0000n : 0n;
        return symbols[cstring(name)] ?? 0n;
      },
      dladdr: (address: bigint, info: Uint8Array) => {
        if (address < IMAGE || address >= IMAGE + 0x10000n) return 0;
        const f = fields(info);
        f.setBigUint64(0, stringAt("/usr/lib/system/libsystem_c.dylib"), true);
        f.setBigUint64(8, IMAGE, true);
        const exported = address >= IMAGE + 0x10a0n ? ["labs", 0x10a0n] as const : ["getpid", 0x1040n] as const;
        f.setBigUint64(16, stringAt(exported[0]), true);
        f.setBigUint64(24, IMAGE + exported[1], true);
        return 1;
      },
      sys_icache_invalidate: () => undefined,
      mach_vm_region_recurse: (
        task: number, address: Uint8Array, size: Uint8Array, depth: Uint8Array, info: Uint8Array, count: Uint8Array,
      ) => {
        assert.equal(task, TASK);
        assert.equal(fields(count).getUint32(0, true), 19, "VM_REGION_SUBMAP_INFO_COUNT_64");
        const found = lookup(entries, fields(address).getBigUint64(0, true), fields(depth).getUint32(0, true), 0);
        if (!found) return 1; // KERN_INVALID_ADDRESS: nothing at or above
        const [e, level] = found;
        fields(address).setBigUint64(0, e.start, true);
        fields(size).setBigUint64(0, e.end - e.start, true);
        fields(depth).setUint32(0, level, true);
        fields(info).setUint32(0, e.protection, true);
        fields(info).setUint32(4, e.maxProtection, true);
        fields(info).setUint32(48, e.submap ? 1 : 0, true);
        return 0;
      },
      proc_regionfilename: (pid: number, address: bigint, buffer: Uint8Array, size: number) => {
        assert.equal(pid, PID);
        const path = new TextEncoder().encode(entryAt(address)?.path ?? "");
        buffer.set(path.subarray(0, size));
        return path.length;
      },
      mach_vm_protect: (task: number, start: bigint, size: bigint, setMaximum: number, protection: number) => {
        assert.equal(task, TASK);
        assert.equal(setMaximum, 0);
        const e = entryAt(start);
        if (!e) return 1;
        const wanted = protection & ~COPY;
        if (wanted & W && (policy.refuseWrite || (e.sharedText && !(protection & COPY)))) return KERN_PROTECTION_FAILURE;
        if (arch === "aarch64" && (wanted & (W | X)) === (W | X)) return KERN_PROTECTION_FAILURE; // W^X
        if (wanted & X && !e.path && policy.refuseExecOfAnonymous) return KERN_PROTECTION_FAILURE;
        if ((wanted & (W | X)) === (W | X) && policy.refuseWriteExecute) return KERN_PROTECTION_FAILURE;
        // VM_PROT_COPY: a private copy, whose maximum protection is everything.
        if (protection & COPY) e.maxProtection = R | W | X;
        if (wanted & ~e.maxProtection) return KERN_PROTECTION_FAILURE;
        if (start === e.start && start + size === e.end) e.protection = wanted;
        return 0;
      },
      mprotect: (start: bigint, _size: bigint, protection: number) => {
        if (policy.refuseMprotect) {
          errno = EACCES;
          return -1;
        }
        const e = entryAt(start);
        if (e) e.protection = protection;
        return 0;
      },
      mach_vm_allocate: (task: number, address: Uint8Array, size: bigint, flags: number) => {
        assert.equal(task, TASK);
        assert.equal(flags, 0, "VM_FLAGS_FIXED");
        const at = fields(address).getBigUint64(0, true);
        if (overlaps(at, at + size)) return KERN_NO_SPACE;
        entries.push({ start: at, end: at + size, protection: R | W, maxProtection: R | W | X });
        runtime.memory.map(at, Number(size));
        return 0;
      },
      mach_vm_remap: (
        task: number, target: Uint8Array, size: bigint, _mask: bigint, flags: number, sourceTask: number,
        source: bigint, copy: number, current: Uint8Array, maximum: Uint8Array, inheritance: number,
      ) => {
        assert.deepEqual([task, sourceTask, flags, copy, inheritance], [TASK, TASK, 1, 0, 2]);
        const alias = nextAlias;
        nextAlias += 0x100000n;
        aliases.push(alias);
        entries.push({ start: alias, end: alias + size, protection: R | W, maxProtection: R | W | X });
        // The same bytes at two addresses: what copy = false means.
        runtime.memory.map(alias, runtime.memory.view(source, Number(size)));
        fields(target).setBigUint64(0, alias, true);
        fields(current).setUint32(0, R | W, true);
        fields(maximum).setUint32(0, R | W | X, true);
        return 0;
      },
      mach_vm_deallocate: (_task: number, address: bigint) => {
        const i = entries.findIndex((e) => e.start === address);
        if (i >= 0) entries.splice(i, 1);
        runtime.memory.unmap(address);
        return 0;
      },
      mmap: (address: bigint, size: bigint, protection: number, _flags: number) => {
        if (overlaps(address, address + size)) return 2n ** 64n - 1n;
        entries.push({ start: address, end: address + size, protection, maxProtection: R | W | X });
        runtime.memory.map(address, Number(size));
        return address;
      },
      munmap: (address: bigint) => {
        const i = entries.findIndex((e) => e.start === address);
        if (i >= 0) entries.splice(i, 1);
        return 0;
      },
    },
  });
  kernel.runtime = runtime;
  runtime.memory.map(ERRNO_AT, 4);
  runtime.memory.map(STRINGS_AT, 4096);
  return kernel;
}

/**
 * A Mach-O image in fake memory: a header with __TEXT (its __text section from +0x1000 to
 * +0x1400), __LINKEDIT and LC_FUNCTION_STARTS naming functions at +0x1000, +0x1040 and +0x10a0.
 */
function machOImage(kernel: Kernel): void {
  const bytes = new Uint8Array(0x10000);
  const f = fields(bytes);
  const text = 0x1_0000_0000n; // link-time address of __TEXT: the image is loaded SLIDE higher
  f.setUint32(0, 0xfeedfacf, true);
  f.setUint32(16, 3, true); // ncmds
  let at = 32;
  const segment = (name: string, vmaddr: bigint, vmsize: bigint, fileoff: bigint, sections: [string, bigint, bigint][]) => {
    const size = 72 + 80 * sections.length;
    f.setUint32(at, 0x19, true);
    f.setUint32(at + 4, size, true);
    bytes.set(new TextEncoder().encode(name), at + 8);
    f.setBigUint64(at + 24, vmaddr, true);
    f.setBigUint64(at + 32, vmsize, true);
    f.setBigUint64(at + 40, fileoff, true);
    f.setUint32(at + 64, sections.length, true);
    sections.forEach(([sectionName, addr, sectionSize], i) => {
      const s = at + 72 + 80 * i;
      bytes.set(new TextEncoder().encode(sectionName), s);
      bytes.set(new TextEncoder().encode(name), s + 16);
      f.setBigUint64(s + 32, addr, true);
      f.setBigUint64(s + 40, sectionSize, true);
    });
    at += size;
  };
  segment("__TEXT", text, 0x8000n, 0n, [["__text", text + 0x1000n, 0x400n], ["__stubs", text + 0x1400n, 0x40n]]);
  segment("__LINKEDIT", text + 0x8000n, 0x8000n, 0x20000n, []);
  f.setUint32(at, 0x26, true); // LC_FUNCTION_STARTS
  f.setUint32(at + 4, 16, true);
  f.setUint32(at + 8, 0x20100, true); // dataoff: file offset, 0x100 into __LINKEDIT
  f.setUint32(at + 12, 8, true);
  f.setUint32(20, at + 16 - 32, true); // sizeofcmds
  bytes.set([0x80, 0x20, 0x40, 0x60, 0, 0, 0, 0], 0x8100); // deltas 0x1000, 0x40, 0x60, end
  kernel.runtime.memory.map(IMAGE, bytes);
  kernel.entries.push(
    { start: IMAGE, end: IMAGE + 0x8000n, protection: R | X, maxProtection: R | X, path: "/usr/lib/system/libsystem_c.dylib", sharedText: true },
    { start: IMAGE + 0x8000n, end: IMAGE + 0x10000n, protection: R, maxProtection: R, path: "/usr/lib/system/libsystem_c.dylib" },
  );
  assert.equal(IMAGE - text, SLIDE);
}

test("darwin: libSystem by path, the page size from sysconf(29), the task port once; osFor picks it", async () => {
  for (const [arch, page] of [["aarch64", 16384], ["x86_64", 4096]] as const) {
    const { runtime } = fakeMac(arch);
    const os = darwin(runtime);
    assert.equal(os.pageSize, page);
    assert.deepEqual(runtime.opened.map((o) => o.path), [LIBSYSTEM]);
    assert.deepEqual(runtime.callsTo("sysconf"), [[29]]);
    assert.equal(runtime.callsTo("mach_task_self").length, 1);
    assert.equal((await osFor(runtime)).pageSize, page);
  }
});

test("darwin: dlsym with RTLD_DEFAULT (-2) or a dlopen'ed handle; typed errors with dlerror's text", () => {
  const mac = fakeMac("aarch64");
  const os = darwin(mac.runtime);
  assert.equal(os.symbolAddress("getpid"), IMAGE + 0x1040n);
  assert.equal(mac.runtime.callsTo("dlsym")[0][0], 2n ** 64n - 2n);
  assert.equal(os.symbolAddress("deflate", "/usr/lib/libz.1.dylib"), 0x1_a000_0000n);
  const [path, mode] = mac.runtime.callsTo("dlopen")[0];
  assert.equal(new TextDecoder().decode(path as Uint8Array), "/usr/lib/libz.1.dylib\0");
  assert.equal(mode, 1, "RTLD_LAZY");
  assertCode(() => os.symbolAddress("nope"), "SYMBOL_NOT_FOUND", /without the leading underscore/);
  assertCode(() => os.symbolAddress("x", "nope.dylib"), "LIBRARY_NOT_FOUND", /no such file/);
});

test("darwin: LC_FUNCTION_STARTS decoding (ULEB128 deltas, ended by zero)", () => {
  assert.deepEqual(decodeFunctionStarts(Uint8Array.of(0x80, 0x20, 0x10, 0xe5, 0x8e, 0x26, 0, 5), 0x1000n), [
    0x2000n, 0x2010n, 0x2010n + 624485n,
  ]);
  assert.deepEqual(decodeFunctionStarts(new Uint8Array(0), 0n), []);
});

test("darwin: a function's extent is the distance to the next function start, the last one ends with __text", () => {
  const mac = fakeMac("aarch64");
  machOImage(mac);
  const os = darwin(mac.runtime);
  const library = "/usr/lib/system/libsystem_c.dylib";
  assert.deepEqual(os.symbolAt(IMAGE + 0x1040n), { name: "getpid", start: IMAGE + 0x1040n, size: 0x60, library });
  // Inside a function: the start of the function holding it.
  assert.deepEqual(os.symbolAt(IMAGE + 0x1050n), { name: "getpid", start: IMAGE + 0x1040n, size: 0x60, library });
  assert.deepEqual(os.symbolAt(IMAGE + 0x10a0n), { name: "labs", start: IMAGE + 0x10a0n, size: 0x1400 - 0x10a0, library });
  // Past __text (in __stubs): no function there, only the nearest exported name without a size.
  assert.deepEqual(os.symbolAt(IMAGE + 0x1404n), { name: "labs", start: IMAGE + 0x10a0n, size: 0, library });
  assert.equal(os.symbolAt(0x1234n), null);
});

test("darwin: an image without LC_FUNCTION_STARTS (or with it unmapped) gives size 0, never a guess", () => {
  const mac = fakeMac("x86_64");
  machOImage(mac);
  mac.entries.pop(); // __LINKEDIT unmapped: the table cannot be read
  const os = darwin(mac.runtime);
  assert.deepEqual(os.symbolAt(IMAGE + 0x1040n), {
    name: "getpid", start: IMAGE + 0x1040n, size: 0, library: "/usr/lib/system/libsystem_c.dylib",
  });
});

test("darwin: mappingAt descends into the shared region's submap; a hole is unmapped", () => {
  const mac = fakeMac("aarch64", [
    { start: 0x1_0000_0000n, end: 0x1_0000_8000n, protection: R | X, maxProtection: R | X, path: "/usr/local/bin/deno" },
    {
      start: 0x1_8000_0000n, end: 0x2_0000_0000n, protection: R, maxProtection: R | W | X, submap: [
        { start: 0x1_8000_0000n, end: 0x1_8100_0000n, protection: R | X, maxProtection: R | X, path: "/usr/lib/dyld" },
        { start: 0x1_9000_0000n, end: 0x1_9100_0000n, protection: R, maxProtection: R, path: "/usr/lib/libc++.dylib" },
      ],
    },
  ]);
  const os = darwin(mac.runtime);
  assert.deepEqual(os.mappingAt(0x1_0000_1000n), { start: 0x1_0000_0000n, end: 0x1_0000_8000n, protection: R | X, path: "" });
  mac.runtime.clear();
  assert.deepEqual(os.mappingAt(0x1_8000_4000n), { start: 0x1_8000_0000n, end: 0x1_8100_0000n, protection: R | X, path: "" });
  // The submap itself first (depth 0), then the entry inside it (depth 1).
  assert.deepEqual(mac.runtime.names(), ["mach_vm_region_recurse", "mach_vm_region_recurse"]);
  assert.equal(os.mappingAt(0x1_8800_0000n), null, "a hole inside the shared region");
  assert.equal(os.mappingAt(0x0_8000_0000n), null, "a hole below the first region");
  assert.equal(os.mappingAt(0x3_0000_0000n), null, "past the last region");
  assert.deepEqual(os.mappings().map((m) => [m.start, m.protection, m.path]), [
    [0x1_0000_0000n, R | X, "/usr/local/bin/deno"],
    [0x1_8000_0000n, R | X, "/usr/lib/dyld"],
    [0x1_9000_0000n, R, "/usr/lib/libc++.dylib"],
  ]);
});

// Darwin's regions name no file: what tells code unmapped and other code mapped in its place is
// the region's extent and protection (src/registry.ts's knownPlace).
test("darwin: a region is the same memory while its extent and protection are", () => {
  const code: Entry = { start: 0x1_0000_0000n, end: 0x1_0000_8000n, protection: R | X, maxProtection: R | X };
  const mac = fakeMac("aarch64", [code]);
  const os = darwin(mac.runtime);
  const first = os.mappingAt(0x1_0000_1000n)!;
  assert.equal(sameMemory(first, os.mappingAt(0x1_0000_4000n)!), true, "the same region, asked at another page");
  code.end = 0x1_0000_c000n; // deallocated, and a larger region allocated at the same place
  assert.equal(sameMemory(first, os.mappingAt(0x1_0000_1000n)!), false);
  code.end = 0x1_0000_8000n;
  code.start = 0x0_ffff_c000n; // one that begins lower
  assert.equal(sameMemory(first, os.mappingAt(0x1_0000_1000n)!), false);
  code.start = 0x1_0000_0000n;
  code.protection = R | W | X;
  assert.equal(sameMemory(first, os.mappingAt(0x1_0000_1000n)!), false, "another protection");
  code.protection = R | X;
  assert.equal(sameMemory(first, os.mappingAt(0x1_0000_1000n)!), true, "the same extent and protection: nothing tells (README, \"Not guaranteed\")");
});

test("darwin arm64: writing code protects with VM_PROT_COPY and without execute (W^X), then read+execute, then flushes", () => {
  const mac = fakeMac("aarch64");
  machOImage(mac);
  const os = darwin(mac.runtime);
  const address = IMAGE + 0x1040n;
  mac.runtime.clear();
  writeCode({ runtime: mac.runtime, os }, [{ address, bytes: Uint8Array.of(0x00, 0x00, 0x00, 0x14) }]);
  assert.deepEqual(mac.runtime.memory.view(address, 4), Uint8Array.of(0x00, 0x00, 0x00, 0x14));
  assert.deepEqual(mac.runtime.names(["mach_vm_protect", "mprotect", "sys_icache_invalidate"]), [
    "mach_vm_protect",
    "mprotect",
    "sys_icache_invalidate",
  ]);
  const page = IMAGE; // 16 KiB pages: the image's first page
  assert.deepEqual(mac.runtime.callsTo("mach_vm_protect"), [[TASK, page, 16384n, 0, R | W | COPY]]);
  assert.deepEqual(mac.runtime.callsTo("mprotect"), [[page, 16384n, R | X]]);
  assert.deepEqual(mac.runtime.callsTo("sys_icache_invalidate"), [[address, 4n]]);
});

test(`darwin arm64: a batch of ${PROTECT_FROM} jumps on one page: one protection pair, each write flushed`, () => {
  const mac = fakeMac("aarch64");
  machOImage(mac);
  const os = darwin(mac.runtime);
  const addresses = Array.from({ length: PROTECT_FROM }, (_, i) => IMAGE + 0x1040n + BigInt(16 * i));
  mac.runtime.clear();
  writeCode({ runtime: mac.runtime, os }, addresses.map((address) => ({ address, bytes: Uint8Array.of(0x00, 0x00, 0x00, 0x14) })));
  for (const address of addresses) assert.deepEqual(mac.runtime.memory.view(address, 4), Uint8Array.of(0x00, 0x00, 0x00, 0x14));
  assert.deepEqual(mac.runtime.callsTo("mach_vm_protect"), [[TASK, IMAGE, 16384n, 0, R | W | COPY]]);
  assert.deepEqual(mac.runtime.callsTo("mprotect"), [[IMAGE, 16384n, R | X]]);
  assert.deepEqual(mac.runtime.callsTo("sys_icache_invalidate"), addresses.map((address) => [address, 4n]));
});

test("darwin x86-64: the page keeps execute while written when allowed, and drops it when refused", () => {
  const mac = fakeMac("x86_64");
  machOImage(mac);
  const os = darwin(mac.runtime);
  mac.runtime.clear();
  os.protect(IMAGE + 0x1000n, 4096, R | W | X);
  assert.deepEqual(mac.runtime.callsTo("mach_vm_protect"), [[TASK, IMAGE + 0x1000n, 4096n, 0, R | W | X | COPY]]);
  // A hardened runtime refuses write+execute: the write goes ahead without execute.
  mac.policy.refuseWriteExecute = true;
  mac.runtime.clear();
  os.protect(IMAGE + 0x1000n, 4096, R | W | X);
  assert.deepEqual(mac.runtime.callsTo("mach_vm_protect").map((a) => a[4]), [R | W | X | COPY, R | W | COPY]);
});

test("darwin: refusals are PROTECT_FAILED naming the hardened runtime and what to do; nothing stays written", () => {
  const mac = fakeMac("aarch64");
  machOImage(mac);
  const os = darwin(mac.runtime);
  const address = IMAGE + 0x1040n;
  const before = mac.runtime.memory.view(address, 4).slice();
  mac.policy.refuseWrite = true;
  assertCode(
    () => writeCode({ runtime: mac.runtime, os }, [{ address, bytes: Uint8Array.of(1, 2, 3, 4) }]),
    "PROTECT_FAILED",
    /KERN_PROTECTION_FAILURE.*hardened runtime.*codesign --force --sign -/s,
  );
  assert.deepEqual(mac.runtime.memory.view(address, 4), before);
  mac.policy.refuseWrite = false;
  mac.policy.refuseMprotect = true;
  assertCode(
    () => os.protect(IMAGE, 16384, R | X),
    "PROTECT_FAILED",
    /EACCES \(Permission denied\).*modified code run again.*disable-executable-page-protection/s,
  );
});

test("darwin: a code block is read+execute near the target with a read+write alias of the same pages, data after it", () => {
  for (const arch of ["aarch64", "x86_64"] as const) {
    const mac = fakeMac(arch);
    machOImage(mac);
    const os = darwin(mac.runtime);
    const page = BigInt(os.pageSize);
    mac.runtime.clear();
    const block = os.allocateCode(IMAGE + 0x1040n, 2n ** 27n, os.pageSize)!;
    assert.ok(block, arch);
    const distance = block.address > IMAGE ? block.address - IMAGE : IMAGE - block.address;
    assert.ok(distance < 2n ** 27n && block.address % page === 0n, `${arch}: near and page aligned`);
    assert.equal(block.writable, mac.aliases[0]);
    assert.equal(block.data, block.address + page);
    assert.equal(block.dataSize, os.pageSize);
    assert.deepEqual(mac.runtime.names(["mach_vm_allocate", "mach_vm_remap", "mach_vm_protect"]), [
      "mach_vm_allocate",
      "mach_vm_remap",
      "mach_vm_protect",
    ]);
    assert.deepEqual(mac.runtime.callsTo("mach_vm_remap")[0].slice(2, 8), [page, 0n, 1, TASK, block.address, 0]);
    assert.deepEqual(mac.runtime.callsTo("mach_vm_protect"), [[TASK, block.address, page, 0, R | X]]);
    // Written through the alias, seen where it runs.
    mac.runtime.view(block.writable, 2).set([0xeb, 0xfe]);
    assert.deepEqual(mac.runtime.view(block.address, 2), Uint8Array.of(0xeb, 0xfe));
  }
});

test("darwin: no executable anonymous memory (hardened runtime): arm64 gives no block, x86-64 maps MAP_JIT", () => {
  const arm = fakeMac("aarch64");
  machOImage(arm);
  arm.policy.refuseExecOfAnonymous = true;
  const armOs = darwin(arm.runtime);
  arm.runtime.clear();
  assert.equal(armOs.allocateCode(IMAGE, 2n ** 27n, armOs.pageSize), null);
  assert.equal(arm.runtime.callsTo("mach_vm_deallocate").length, 2, "both halves given back");
  assert.equal(arm.runtime.callsTo("mmap").length, 0, "no MAP_JIT on arm64");

  const intel = fakeMac("x86_64");
  machOImage(intel);
  intel.policy.refuseExecOfAnonymous = true;
  const intelOs = darwin(intel.runtime);
  const block = intelOs.allocateCode(IMAGE, 2n ** 31n, 4096)!;
  assert.equal(block.writable, block.address, "MAP_JIT memory is its own write alias");
  const [at, size, protection, flags] = intel.runtime.callsTo("mmap")[0];
  assert.deepEqual([at, size, protection, flags], [block.address, 8192n, R | W | X, 0x0002 | 0x0800 | 0x1000]);
});

test("darwin: flushCode is sys_icache_invalidate over exactly the range; no Mach-O stub library yet", () => {
  const mac = fakeMac("aarch64");
  const os = darwin(mac.runtime);
  os.flushCode(0x1234_5678n, 24);
  assert.deepEqual(mac.runtime.callsTo("sys_icache_invalidate"), [[0x1234_5678n, 24n]]);
  assertCode(() => os.loadableImage(new Uint8Array(16)), "UNSUPPORTED_PLATFORM", /Mach-O/);
});
