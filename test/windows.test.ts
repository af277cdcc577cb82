/**
 * The Windows layer against a fake kernel32/ntdll: the exact calls it makes, in order, with their
 * arguments. (test/windows_e2e.test.ts runs it for real under Wine.)
 */
import { assert, assertCode, test } from "./harness.ts";
import { pageProtection, protectionBits, wideString, windows } from "../platform/windows.ts";
import { osFor, sameMemory } from "../platform/mod.ts";
import { buildStubImage } from "../platform/image/elf.ts";
import { importingDll } from "./import_dll.ts";
import { peExports, peImports } from "../platform/image/pe_loaded.ts";
import { x86_64 } from "../src/arch/x86_64/mod.ts";
import { PROTECT_FROM, writeCode } from "../src/code_memory.ts";
import { fakeRuntime, fields, windowsSystemInfo } from "./fake_ffi.ts";
import type { FakeRuntime } from "./fake_ffi.ts";

const R = 1, W = 2, X = 4;
const PAGE_READONLY = 0x02, PAGE_READWRITE = 0x04, PAGE_EXECUTE_READ = 0x20, PAGE_EXECUTE_READWRITE = 0x40;
const PAGE_GUARD = 0x100, PAGE_NOCACHE = 0x200;
const MEM_COMMIT = 0x1000, MEM_RESERVE = 0x2000, MEM_FREE = 0x10000, MEM_IMAGE = 0x1000000, MEM_MAPPED = 0x40000, MEM_PRIVATE = 0x20000;
const KERNEL32 = 0x7ff8_0000_0000n;
const KERNELBASE = 0x7ff9_0000_0000n;
const STUBS = 0x7ffa_0000_0000n; // a stub library: its exports are jmp [rip+x] through its own slots
const EXTRA = 0x7ffb_0000_0000n;

interface Region {
  start: bigint;
  end: bigint;
  state: number;
  protect: number;
  type: number;
  base: bigint;
}

interface FakeWindows {
  runtime: FakeRuntime;
  regions: Region[];
  files: Map<string, Uint8Array>;
  policy: { refuseProtect: boolean };
}

interface Module {
  base: bigint;
  name: string;
  path: string;
  exports: Record<string, bigint>;
}

const decodeWide = (bytes: Uint8Array) => {
  const units = new Uint16Array(bytes.slice().buffer);
  return String.fromCharCode(...units.subarray(0, units.indexOf(0)));
};
const decodeAnsi = (bytes: Uint8Array) => new TextDecoder().decode(bytes.subarray(0, bytes.indexOf(0)));

/** A fake process: kernel32 (with an import thunk into kernelbase), kernelbase, a stub library. */
function fakeWindows(): FakeWindows {
  const policy = { refuseProtect: false };
  const files = new Map<string, Uint8Array>();
  let lastError = 0;
  const modules: Module[] = [
    { base: KERNEL32, name: "kernel32.dll", path: "C:\\windows\\system32\\kernel32.dll", exports: { GetCurrentProcessId: KERNEL32 + 0x1000n, Beep: KERNEL32 + 0x1010n } },
    { base: KERNELBASE, name: "kernelbase.dll", path: "C:\\windows\\system32\\kernelbase.dll", exports: { GetCurrentProcessId: KERNELBASE + 0x2000n } },
    { base: STUBS, name: "stubs.dll", path: "C:\\temp\\stubs.dll", exports: { stub_0: STUBS + 0x1000n } },
  ];
  const image = (base: bigint): Region[] => [
    { start: base, end: base + 0x1000n, state: MEM_COMMIT, protect: PAGE_READONLY, type: MEM_IMAGE, base },
    { start: base + 0x1000n, end: base + 0x3000n, state: MEM_COMMIT, protect: PAGE_EXECUTE_READ, type: MEM_IMAGE, base },
    { start: base + 0x3000n, end: base + 0x10000n, state: MEM_COMMIT, protect: PAGE_READWRITE, type: MEM_IMAGE, base },
  ];
  const regions: Region[] = [
    { start: 0x10000n, end: 0x20000n, state: MEM_COMMIT, protect: PAGE_READWRITE, type: 0x20000, base: 0x10000n },
    { start: 0x7ff7_fff0_0000n, end: 0x7ff7_fff8_0000n, state: MEM_RESERVE, protect: 0, type: 0x20000, base: 0x7ff7_fff0_0000n },
    ...image(KERNEL32),
    ...image(KERNELBASE),
    ...image(STUBS),
  ];
  const sections = new Map<bigint, Uint8Array>();
  let nextSection = 0x100n, nextView = 0x2000_0000_0000n;
  const kernel = { regions, files, policy } as FakeWindows;
  const sorted = () => regions.sort((a, b) => (a.start < b.start ? -1 : 1));
  const regionAt = (address: bigint) => regions.find((r) => address >= r.start && address < r.end);
  const moduleAt = (address: bigint) => modules.find((m) => address >= m.base && address < m.base + 0x10000n);
  const fail = (code: number, result: unknown = 0) => {
    lastError = code;
    return result;
  };

  const runtime = fakeRuntime({
    os: "windows",
    arch: "x86_64",
    functions: {
      GetLastError: () => lastError,
      GetSystemInfo: windowsSystemInfo,
      GetCurrentProcess: () => -1n,
      GetCurrentProcessId: () => 77,
      GetModuleHandleW: (name: Uint8Array) => modules.find((m) => m.name === decodeWide(name).toLowerCase())?.base ?? fail(126, 0n),
      LoadLibraryW: (name: Uint8Array) => {
        if (decodeWide(name) !== "extra.dll") return fail(126, 0n);
        modules.push({ base: EXTRA, name: "extra.dll", path: "C:\\extra.dll", exports: { extra: EXTRA + 0x1000n } });
        regions.push(...image(EXTRA));
        runtime.memory.map(EXTRA, 0x10000);
        return EXTRA;
      },
      GetProcAddress: (module: bigint, name: Uint8Array) =>
        modules.find((m) => m.base === module)?.exports[decodeAnsi(name)] ?? fail(127, 0n),
      GetModuleHandleExW: (flags: number, address: bigint, out: Uint8Array) => {
        assert.equal(flags, 0x4 | 0x2, "FROM_ADDRESS | UNCHANGED_REFCOUNT");
        const m = moduleAt(address);
        if (!m) return fail(126);
        fields(out).setBigUint64(0, m.base, true);
        return 1;
      },
      GetModuleFileNameW: (module: bigint, buffer: Uint8Array, size: number) => {
        const path = modules.find((m) => m.base === module)?.path ?? "";
        buffer.set(wideString(path).subarray(0, 2 * size));
        return path.length;
      },
      K32EnumProcessModules: (process: bigint, buffer: Uint8Array, size: number, needed: Uint8Array) => {
        assert.equal(process, -1n);
        modules.slice(0, size / 8).forEach((m, i) => fields(buffer).setBigUint64(8 * i, m.base, true));
        fields(needed).setUint32(0, 8 * modules.length, true);
        return 1;
      },
      VirtualQuery: (address: bigint, mbi: Uint8Array, size: bigint) => {
        assert.equal(size, 48n);
        const f = fields(mbi);
        const r = regionAt(address);
        if (r) {
          f.setBigUint64(0, r.start, true);
          f.setBigUint64(8, r.base, true);
          f.setBigUint64(24, r.end - r.start, true);
          f.setUint32(32, r.state, true);
          f.setUint32(36, r.state === MEM_COMMIT ? r.protect : 0, true);
          f.setUint32(40, r.type, true);
          return 48n;
        }
        if (address >= 0x7fff_ffff_0000n) return 0n;
        const below = sorted().filter((x) => x.end <= address).at(-1)?.end ?? 0n;
        const above = regions.find((x) => x.start > address)?.start ?? 0x7fff_ffff_0000n;
        f.setBigUint64(0, below, true);
        f.setBigUint64(24, above - below, true);
        f.setUint32(32, MEM_FREE, true);
        f.setUint32(36, 1, true);
        return 48n;
      },
      VirtualProtect: (address: bigint, size: bigint, protect: number, old: Uint8Array) => {
        const r = regionAt(address);
        if (!r || policy.refuseProtect || address + size > r.end) return fail(487);
        fields(old).setUint32(0, r.protect, true);
        // Split the region around the pages changed, as the kernel does.
        const end = address + size;
        if (end < r.end) regions.push({ ...r, start: end });
        if (address > r.start) regions.push({ ...r, end: address });
        Object.assign(r, { start: address, end, protect });
        return 1;
      },
      FlushInstructionCache: () => 1,
      CreateFileMappingW: (file: bigint, attributes: bigint, protect: number, high: number, low: number, name: bigint) => {
        assert.deepEqual([file, attributes, protect, high, name], [2n ** 64n - 1n, 0n, PAGE_EXECUTE_READWRITE, 0, 0n]);
        const handle = nextSection;
        nextSection += 4n;
        sections.set(handle, new Uint8Array(low));
        return handle;
      },
      MapViewOfFileEx: (section: bigint, access: number, _high: number, _low: number, size: bigint, at: bigint) => {
        const bytes = sections.get(section)!;
        const start = at === 0n ? (nextView += 0x10000n) : at;
        if (start % 0x10000n !== 0n || regions.some((r) => r.start < start + size && start < r.end)) return fail(487, 0n);
        regions.push({
          start, end: start + BigInt(Math.ceil(Number(size) / 4096) * 4096), state: MEM_COMMIT,
          protect: access & 0x20 ? PAGE_EXECUTE_READWRITE : PAGE_READWRITE, type: MEM_MAPPED, base: start,
        });
        runtime.memory.map(start, bytes.subarray(0, Number(size)));
        return start;
      },
      UnmapViewOfFile: (address: bigint) => {
        for (let i = regions.length - 1; i >= 0; i--) if (regions[i].base === address) regions.splice(i, 1);
        runtime.memory.unmap(address);
        return 1;
      },
      CloseHandle: () => 1,
      GetTempPathW: (size: number, buffer: Uint8Array) => {
        buffer.set(wideString("C:\\temp\\").subarray(0, 2 * size));
        return 8;
      },
      CreateFileW: (path: Uint8Array) => {
        files.set(decodeWide(path), new Uint8Array(0));
        return 0x44n;
      },
      WriteFile: (file: bigint, bytes: Uint8Array, size: number, written: Uint8Array) => {
        assert.equal(file, 0x44n);
        const path = [...files.keys()].at(-1)!;
        files.set(path, bytes.slice(0, size));
        fields(written).setUint32(0, size, true);
        return 1;
      },
      RtlLookupFunctionEntry: (pc: bigint, base: Uint8Array, history: bigint) => {
        assert.equal(history, 0n);
        // kernelbase's GetCurrentProcessId: RUNTIME_FUNCTION { 0x2000, 0x2030, unwind } at +0x5000.
        if (pc < KERNELBASE + 0x2000n || pc >= KERNELBASE + 0x2030n) return 0n;
        fields(base).setBigUint64(0, KERNELBASE, true);
        return KERNELBASE + 0x5000n;
      },
    },
  });
  kernel.runtime = runtime;
  for (const m of modules) runtime.memory.map(m.base, 0x10000);
  const k32 = fields(runtime.memory.view(KERNEL32, 0x10000));
  // kernel32!GetCurrentProcessId: jmp qword [rip+0x2ffa] through kernel32's import slot at +0x4000.
  runtime.memory.write(KERNEL32 + 0x1000n, [0xff, 0x25, 0xfa, 0x2f, 0, 0]);
  k32.setBigUint64(0x4000, KERNELBASE + 0x2000n, true);
  // kernel32!Beep: jmp qword [rip+x] through a slot pointing into kernel32 itself: not a thunk.
  runtime.memory.write(KERNEL32 + 0x1010n, [0x48, 0xff, 0x25, 0xf1, 0x2f, 0, 0]); // slot +0x4008
  k32.setBigUint64(0x4008, KERNEL32 + 0x2000n, true);
  runtime.memory.write(KERNELBASE + 0x2000n, [0x65, 0x48, 0x8b, 0x04, 0x25, 0x30, 0, 0, 0, 0x8b, 0x40, 0x40, 0xc3]);
  // The stub library's export jumps through its own data slot, which points at code in no module.
  runtime.memory.write(STUBS + 0x1000n, [0xff, 0x25, 0xfa, 0x2f, 0, 0]);
  fields(runtime.memory.view(STUBS, 0x10000)).setBigUint64(0x4000, 0x1234_0000n, true);
  // kernelbase's headers and export table (for names) and its .pdata entry.
  const kb = fields(runtime.memory.view(KERNELBASE, 0x10000));
  kb.setUint32(0x3c, 0x80, true);
  kb.setUint32(0x80 + 24 + 112, 0x6000, true);
  kb.setUint32(0x6000 + 20, 1, true);
  kb.setUint32(0x6000 + 24, 1, true);
  kb.setUint32(0x6000 + 28, 0x6100, true);
  kb.setUint32(0x6000 + 32, 0x6200, true);
  kb.setUint32(0x6000 + 36, 0x6300, true);
  kb.setUint32(0x6100, 0x2000, true);
  kb.setUint32(0x6200, 0x6400, true);
  runtime.memory.writeCString(KERNELBASE + 0x6400n, "GetCurrentProcessId");
  kb.setUint32(0x5000, 0x2000, true);
  kb.setUint32(0x5004, 0x2030, true);
  return kernel;
}

test("windows: page size and allocation granularity from GetSystemInfo; kernel32 and ntdll; osFor picks it", async () => {
  const { runtime } = fakeWindows();
  const os = windows(runtime);
  assert.equal(os.pageSize, 4096);
  assert.deepEqual(runtime.opened.map((o) => o.path), ["kernel32.dll", "ntdll.dll"]);
  assert.equal((await osFor(runtime)).pageSize, 4096);
});

test("windows: PAGE_* protections and PROT_* bits", () => {
  assert.equal(protectionBits(PAGE_EXECUTE_READ), R | X);
  assert.equal(protectionBits(0x80), R | W | X, "PAGE_EXECUTE_WRITECOPY");
  assert.equal(protectionBits(0x08), R | W, "PAGE_WRITECOPY");
  assert.equal(protectionBits(PAGE_EXECUTE_READ | PAGE_NOCACHE), R | X);
  assert.equal(protectionBits(PAGE_READWRITE | PAGE_GUARD), 0, "a guard page cannot be touched");
  assert.equal(pageProtection(R | W | X), PAGE_EXECUTE_READWRITE);
  assert.equal(pageProtection(R | X), PAGE_EXECUTE_READ);
  assert.equal(pageProtection(R), PAGE_READONLY);
  assert.equal(pageProtection(0), 0x01);
});

test("windows: symbols through GetModuleHandleW (UTF-16), LoadLibraryW when not loaded, GetProcAddress (ANSI)", () => {
  const win = fakeWindows();
  const os = windows(win.runtime);
  win.runtime.clear();
  assert.equal(os.symbolAddress("Beep", "KERNEL32.DLL"), KERNEL32 + 0x1010n);
  assert.equal(decodeWide(win.runtime.callsTo("GetModuleHandleW")[0][0] as Uint8Array), "KERNEL32.DLL");
  assert.equal(decodeAnsi(win.runtime.callsTo("GetProcAddress")[0][1] as Uint8Array), "Beep");
  assert.equal(win.runtime.callsTo("LoadLibraryW").length, 0, "a loaded module is not loaded again");
  assert.equal(os.symbolAddress("extra", "extra.dll"), EXTRA + 0x1000n);
  assert.deepEqual(win.runtime.names(["GetModuleHandleW", "LoadLibraryW", "GetProcAddress"]).slice(-3), [
    "GetModuleHandleW", "LoadLibraryW", "GetProcAddress",
  ]);
  assertCode(() => os.symbolAddress("x", "nope.dll"), "LIBRARY_NOT_FOUND", /ERROR_MOD_NOT_FOUND \(126\)/);
  assertCode(() => os.symbolAddress("Nope", "kernel32.dll"), "SYMBOL_NOT_FOUND", /A or W form/);
});

test("windows: with no library, the loaded modules in load order (K32EnumProcessModules on the -1 handle)", () => {
  const win = fakeWindows();
  const os = windows(win.runtime);
  win.runtime.clear();
  assert.equal(os.symbolAddress("stub_0"), STUBS + 0x1000n);
  const [process, , size] = win.runtime.callsTo("K32EnumProcessModules")[0];
  assert.deepEqual([process, size], [-1n, 256 * 8]);
  assert.deepEqual(win.runtime.callsTo("GetProcAddress").map((a) => a[0]), [KERNEL32, KERNELBASE, STUBS]);
  assertCode(() => os.symbolAddress("Nope"), "SYMBOL_NOT_FOUND", /any loaded module/);
});

test("windows: kernel32's jmp [rip+x] import thunk is followed into kernelbase; other jumps are not", () => {
  const win = fakeWindows();
  const os = windows(win.runtime);
  assert.equal(os.symbolAddress("GetCurrentProcessId", "kernel32.dll"), KERNELBASE + 0x2000n);
  assert.equal(os.symbolAddress("GetCurrentProcessId"), KERNELBASE + 0x2000n, "kernel32 comes first, and is followed");
  // Beep's jump stays inside kernel32, and a stub library's slot leads into no module.
  assert.equal(os.symbolAddress("Beep", "kernel32.dll"), KERNEL32 + 0x1010n);
  assert.equal(os.symbolAddress("stub_0", "stubs.dll"), STUBS + 0x1000n);
});

test("windows: the extent comes from .pdata (RtlLookupFunctionEntry), the name from the export table", () => {
  const win = fakeWindows();
  const os = windows(win.runtime);
  const library = "C:\\windows\\system32\\kernelbase.dll";
  assert.deepEqual(os.symbolAt(KERNELBASE + 0x2000n), { name: "GetCurrentProcessId", start: KERNELBASE + 0x2000n, size: 0x30, library });
  assert.deepEqual(os.symbolAt(KERNELBASE + 0x2010n), { name: "GetCurrentProcessId", start: KERNELBASE + 0x2000n, size: 0x30, library });
  assert.equal(os.symbolAt(KERNELBASE + 0x2100n), null, "no .pdata entry and no export: unknown");
  assert.equal(os.symbolAt(0x1234_0000n), null);
});

test("windows: mappingAt from VirtualQuery: committed memory only, with its protection bits", () => {
  const win = fakeWindows();
  const os = windows(win.runtime);
  assert.deepEqual(os.mappingAt(KERNEL32 + 0x1800n), {
    start: KERNEL32 + 0x1000n, end: KERNEL32 + 0x3000n, protection: R | X, path: "", allocation: { base: KERNEL32, kind: MEM_IMAGE },
  });
  assert.equal(os.mappingAt(0x7ff7_fff4_0000n), null, "reserved");
  assert.equal(os.mappingAt(0x5000_0000n), null, "free");
  const all = os.mappings();
  assert.equal(all.filter((m) => m.path === "C:\\windows\\system32\\kernel32.dll").length, 3);
  assert.ok(all.every((m, i) => i === 0 || all[i - 1].end <= m.start), "in address order");
});

// What tells a loaded image, or other memory, from what is loaded or allocated at the same place
// once it is gone (src/registry.ts's knownPlace forgets what it learnt of code there otherwise).
test("windows: mappingAt names the allocation from the same VirtualQuery: an image is the same while its base, end and protection are", () => {
  const win = fakeWindows();
  const os = windows(win.runtime);
  win.runtime.clear();
  const loaded = os.mappingAt(KERNELBASE + 0x1800n)!;
  assert.deepEqual(loaded.allocation, { base: KERNELBASE, kind: MEM_IMAGE });
  assert.deepEqual(win.runtime.names(), ["VirtualQuery"], "one query, as before");
  // VirtualQuery's region starts at the page asked about: the same image, asked at another page.
  assert.equal(sameMemory(loaded, { ...os.mappingAt(KERNELBASE + 0x1800n)!, start: KERNELBASE + 0x2000n }), true);
  // Unloaded, and another image loaded at the same place with another layout.
  const text = win.regions.find((r) => r.start === KERNELBASE + 0x1000n)!;
  text.end = KERNELBASE + 0x4000n;
  assert.equal(sameMemory(loaded, os.mappingAt(KERNELBASE + 0x1800n)!), false, "another end");
  text.end = KERNELBASE + 0x3000n;
  text.base = KERNELBASE + 0x1000n;
  assert.equal(sameMemory(loaded, os.mappingAt(KERNELBASE + 0x1800n)!), false, "another allocation base");
  text.base = KERNELBASE;
  text.protect = PAGE_EXECUTE_READWRITE;
  assert.equal(sameMemory(loaded, os.mappingAt(KERNELBASE + 0x1800n)!), false, "another protection");
});

test("windows: private memory is the same allocation while its base, kind, end and protection are", () => {
  const win = fakeWindows();
  const os = windows(win.runtime);
  win.runtime.clear();
  const first = os.mappingAt(0x18000n)!;
  assert.deepEqual(first.allocation, { base: 0x10000n, kind: MEM_PRIVATE });
  const region = win.regions.find((r) => r.start === 0x10000n)!;
  region.end = 0x30000n; // freed, and a larger allocation made at the same base
  assert.equal(sameMemory(first, os.mappingAt(0x18000n)!), false);
  region.end = 0x20000n;
  region.protect = PAGE_EXECUTE_READ;
  assert.equal(sameMemory(first, os.mappingAt(0x18000n)!), false, "another protection");
  region.protect = PAGE_READWRITE;
  region.type = MEM_MAPPED;
  assert.equal(sameMemory(first, os.mappingAt(0x18000n)!), false, "a view mapped there instead");
  region.type = MEM_PRIVATE;
  // The same base, kind, end and protection: nothing in the map tells (README, "Not guaranteed").
  assert.equal(sameMemory(first, os.mappingAt(0x18000n)!), true);
});

test("windows: writing code: VirtualProtect(PAGE_EXECUTE_READWRITE), store, the exact old protection back, FlushInstructionCache(-1, ...)", () => {
  const win = fakeWindows();
  const os = windows(win.runtime);
  const text = win.regions.find((r) => r.start === KERNELBASE + 0x1000n)!;
  text.protect = PAGE_EXECUTE_READ | PAGE_NOCACHE; // an unusual protection, to see it come back as it was
  const address = KERNELBASE + 0x2000n;
  win.runtime.clear();
  writeCode({ runtime: win.runtime, os }, [{ address, bytes: Uint8Array.of(0xe9, 1, 2, 3, 4) }]);
  assert.deepEqual(win.runtime.memory.view(address, 5), Uint8Array.of(0xe9, 1, 2, 3, 4));
  assert.deepEqual(win.runtime.names(["VirtualQuery", "VirtualProtect", "FlushInstructionCache"]), [
    "VirtualQuery", "VirtualProtect", "VirtualProtect", "FlushInstructionCache",
  ]);
  const [open, close] = win.runtime.callsTo("VirtualProtect");
  assert.deepEqual(open.slice(0, 3), [address, 4096n, PAGE_EXECUTE_READWRITE]);
  assert.deepEqual(close.slice(0, 3), [address, 4096n, PAGE_EXECUTE_READ | PAGE_NOCACHE]);
  assert.deepEqual(win.runtime.callsTo("FlushInstructionCache"), [[-1n, address, 5n]]);
  assert.equal(text.protect, PAGE_EXECUTE_READ | PAGE_NOCACHE);
  win.runtime.clear();
  assert.equal(os.forceWrite(address, Uint8Array.of(0xcc)), false, "no forced write (WriteProcessMemory opens the page itself, and is slower)");
  assert.deepEqual(win.runtime.names(), [], "no foreign call");
  assert.equal(win.runtime.memory.view(address, 1)[0], 0xe9, "nothing written");
});

test(`windows: a batch of ${PROTECT_FROM} entry jumps on one page: one VirtualQuery, one VirtualProtect pair, each write flushed`, () => {
  const win = fakeWindows();
  const os = windows(win.runtime);
  const text = win.regions.find((r) => r.start === KERNELBASE + 0x1000n)!;
  text.protect = PAGE_EXECUTE_READ | PAGE_NOCACHE;
  const addresses = Array.from({ length: PROTECT_FROM }, (_, i) => KERNELBASE + 0x2000n + BigInt(16 * i));
  win.runtime.clear();
  writeCode({ runtime: win.runtime, os }, addresses.map((address) => ({ address, bytes: Uint8Array.of(0xe9, 1, 2, 3, 4) })));
  for (const address of addresses) assert.deepEqual(win.runtime.memory.view(address, 5), Uint8Array.of(0xe9, 1, 2, 3, 4));
  assert.deepEqual(win.runtime.names(["VirtualQuery", "VirtualProtect"]), ["VirtualQuery", "VirtualProtect", "VirtualProtect"]);
  const [open, close] = win.runtime.callsTo("VirtualProtect");
  assert.deepEqual(open.slice(0, 3), [addresses[0], 4096n, PAGE_EXECUTE_READWRITE]);
  assert.deepEqual(close.slice(0, 3), [addresses[0], 4096n, PAGE_EXECUTE_READ | PAGE_NOCACHE]);
  assert.deepEqual(win.runtime.callsTo("FlushInstructionCache"), addresses.map((address) => [-1n, address, 5n]));
  assert.equal(text.protect, PAGE_EXECUTE_READ | PAGE_NOCACHE);
});

test("windows: a refused VirtualProtect is PROTECT_FAILED with the error; nothing is written", () => {
  const win = fakeWindows();
  const os = windows(win.runtime);
  const address = KERNELBASE + 0x2000n;
  const before = win.runtime.memory.view(address, 5).slice();
  win.policy.refuseProtect = true;
  assertCode(
    () => writeCode({ runtime: win.runtime, os }, [{ address, bytes: Uint8Array.of(0xe9, 1, 2, 3, 4) }]),
    "PROTECT_FAILED",
    /VirtualProtect\(0x7ff900002000, 4096, 0x40 \[rwx\]\) failed: ERROR_INVALID_ADDRESS \(487\)/,
  );
  assert.deepEqual(win.runtime.memory.view(address, 5), before);
});

test("windows: a code block is a section mapped twice: read+execute near the target on 64 KiB, a read+write alias", () => {
  const win = fakeWindows();
  const os = windows(win.runtime);
  win.runtime.clear();
  const near = KERNEL32 + 0x1000n;
  const block = os.allocateCode(near, 2n ** 31n, 4096)!;
  assert.ok(block);
  assert.equal(block.address % 0x10000n, 0n);
  const distance = block.address > near ? block.address - near : near - block.address;
  assert.ok(distance < 2n ** 31n, "within reach");
  assert.equal(block.data, block.address + 4096n);
  assert.deepEqual(win.runtime.callsTo("CreateFileMappingW")[0].slice(2, 5), [PAGE_EXECUTE_READWRITE, 0, 8192]);
  const [exec, alias] = win.runtime.callsTo("MapViewOfFileEx");
  assert.deepEqual(exec, [0x100n, 0x4 | 0x2 | 0x20, 0, 0, 8192n, block.address]);
  assert.deepEqual(alias, [0x100n, 0x2, 0, 0, 4096n, 0n]);
  assert.deepEqual(win.runtime.callsTo("VirtualProtect").map((a) => a.slice(0, 3)), [
    [block.address, 4096n, PAGE_EXECUTE_READ],
    [block.address + 4096n, 4096n, PAGE_READWRITE],
  ]);
  assert.equal(os.mappingAt(block.address)!.protection, R | X);
  assert.equal(os.mappingAt(block.writable)!.protection, R | W);
  win.runtime.view(block.writable, 1).set([0xc3]);
  assert.equal(win.runtime.view(block.address, 1)[0], 0xc3, "the same pages");
  assert.deepEqual(win.runtime.names(["CloseHandle"]), ["CloseHandle"], "the section handle is closed: the views keep it");
});

test("windows: a code block of less than a page is a whole page, so the data page's protection stays off the code", () => {
  const win = fakeWindows();
  const os = windows(win.runtime);
  win.runtime.clear();
  const block = os.allocateCode(KERNEL32 + 0x1000n, 2n ** 31n, 16)!;
  assert.ok(block);
  assert.equal(block.size, 4096);
  assert.equal(block.data, block.address + 4096n);
  assert.deepEqual(win.runtime.callsTo("VirtualProtect").map((a) => a.slice(0, 3)), [
    [block.address, 4096n, PAGE_EXECUTE_READ],
    [block.address + 4096n, 4096n, PAGE_READWRITE],
  ]);
  assert.equal(os.mappingAt(block.address)!.protection, R | X);
});

test("windows: the stub library is a PE DLL in the temp directory, its stubs and slots as far apart as in the ELF image", () => {
  const win = fakeWindows();
  const os = windows(win.runtime);
  const image = buildStubImage({
    machine: "x86_64",
    count: 12,
    prefix: "redefine_original_0_",
    stubSize: x86_64.indirectJumpSize,
    jump: (stub, slot) => x86_64.indirectJump(BigInt(stub), BigInt(slot)),
  });
  const path = os.loadableImage(image.bytes);
  assert.match(path, /^C:\\temp\\redefine-stubs-77-0-[0-9a-z]+\.dll$/);
  const dll = win.files.get(path)!;
  const v = new DataView(dll.buffer);
  assert.equal(String.fromCharCode(dll[0], dll[1]), "MZ");
  const pe = v.getUint32(0x3c, true);
  assert.equal(v.getUint32(pe, true), 0x4550, "PE\\0\\0");
  assert.equal(v.getUint16(pe + 4, true), 0x8664);
  assert.equal(v.getUint16(pe + 24, true), 0x20b, "PE32+");
  // RVA → file offset through the section table.
  const sections = Array.from({ length: v.getUint16(pe + 6, true) }, (_, i) => {
    const h = pe + 24 + 240 + 40 * i;
    return { rva: v.getUint32(h + 12, true), raw: v.getUint32(h + 16, true), at: v.getUint32(h + 20, true) };
  });
  const file = (rva: number) => {
    const s = sections.find((s) => rva >= s.rva && rva < s.rva + s.raw)!;
    return rva - s.rva + s.at;
  };
  const exportsAt = file(v.getUint32(pe + 24 + 112, true));
  const count = v.getUint32(exportsAt + 24, true);
  assert.equal(count, 12);
  const names: string[] = [];
  for (let i = 0; i < count; i++) {
    const nameAt = file(v.getUint32(file(v.getUint32(exportsAt + 32, true)) + 4 * i, true));
    const name = new TextDecoder().decode(dll.subarray(nameAt, dll.indexOf(0, nameAt)));
    names.push(name);
    const ordinal = v.getUint16(file(v.getUint32(exportsAt + 36, true)) + 2 * i, true);
    const rva = v.getUint32(file(v.getUint32(exportsAt + 28, true)) + 4 * ordinal, true);
    const index = Number(name.slice("redefine_original_0_".length));
    assert.equal(rva, 0x1000 + image.stubOffset(index), name);
    // The stub's jmp [rip+x] lands on its slot, one page up as the whole image is.
    const code = dll.subarray(file(rva), file(rva) + 6);
    assert.deepEqual([code[0], code[1]], [0xff, 0x25]);
    assert.equal(rva + 6 + new DataView(code.slice().buffer).getInt32(2, true), 0x1000 + image.slotOffset(index));
  }
  assert.deepEqual(names, [...names].sort(), "names sorted, as the loader's binary search wants");
});

test("windows: a DLL importing given functions: descriptors per DLL, a slot each, and call_ exports jumping through them", () => {
  const file = importingDll("imports.dll", [
    { library: "kernel32.dll", name: "GetTickCount" },
    { library: "ntdll.dll", name: "NtClose" },
    { library: "kernel32.dll", name: "Sleep" },
  ]);
  // Mapped as the loader maps it, before binding: the headers, then each section at its RVA.
  const v = fields(file);
  const pe = v.getUint32(0x3c, true), sections = v.getUint16(pe + 6, true), table = pe + 24 + v.getUint16(pe + 20, true);
  const image = new Uint8Array(v.getUint32(pe + 24 + 56, true));
  image.set(file.subarray(0, v.getUint32(pe + 24 + 60, true)));
  for (let i = 0; i < sections; i++) {
    const h = table + 40 * i, raw = v.getUint32(h + 20, true);
    image.set(file.subarray(raw, raw + v.getUint32(h + 16, true)).subarray(0, v.getUint32(h + 8, true)), v.getUint32(h + 12, true));
  }
  const read = (address: bigint, length: number) => image.slice(Number(address), Number(address) + length);
  const imported = peImports(read, 0n);
  assert.deepEqual(imported.map((i) => [i.name, i.from]), [
    ["GetTickCount", "kernel32.dll"], ["Sleep", "kernel32.dll"], ["NtClose", "ntdll.dll"],
  ]);
  assert.ok(imported.every((i) => i.slot % 8n === 0n), "8-byte aligned slots");
  const exported = peExports(read, 0n);
  assert.deepEqual(exported.map((e) => e.name), ["call_GetTickCount", "call_NtClose", "call_Sleep"]);
  for (const e of exported) {
    assert.ok(e.executable, `${e.name} is code`);
    const code = read(e.address, 6);
    assert.deepEqual([...code.subarray(0, 2)], [0xff, 0x25], "jmp qword [rip+disp32]");
    const slot = e.address + 6n + BigInt(fields(code).getInt32(2, true));
    assert.equal(slot, imported.find((i) => `call_${i.name}` === e.name)!.slot, `${e.name} jumps through its own slot`);
  }
});
