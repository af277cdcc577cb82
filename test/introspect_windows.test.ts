/**
 * Introspection of the Windows layer against a fake kernel32 and a PE image laid out in fake
 * memory as the loader maps it: modules in load order, the export directory (functions, data, a
 * forwarder, `.pdata` extents), the import address table, and reads refused outside committed
 * memory.
 */
import { assert, assertCode, test } from "./harness.ts";
import { windows } from "../platform/windows.ts";
import { matchModule } from "../src/introspect.ts";
import { fakeRuntime, fields, windowsSystemInfo } from "./fake_ffi.ts";
import type { FakeMemory } from "./fake_ffi.ts";

const APP = 0x1_4000_0000n;
const KERNEL32 = 0x7ff8_0000_0000n;
const FORWARDED = KERNEL32 + 0x5000n; // where GetProcAddress says the forwarder leads
const MEM_COMMIT = 0x1000, MEM_FREE = 0x10000, MEM_IMAGE = 0x1000000;
const PAGE_READONLY = 0x02, PAGE_READWRITE = 0x04, PAGE_EXECUTE_READ = 0x20;

/** RVAs of the pieces of the fake image. */
const TEXT = 0x1000, DATA = 0x2000, IAT = 0x2300, IMPORTS = 0x2400, LOOKUP = 0x2500, PDATA = 0x2600, STRINGS = 0x2700;
const SIZE_OF_IMAGE = 0x3800; // rounds up to 0x4000 in whole pages

/**
 * Lays out a PE32+ image at `base` as the loader maps it (by RVA): headers, `.text`, `.data`
 * holding the export directory, an import descriptor for KERNEL32.dll, `.pdata`.
 */
function layImage(memory: FakeMemory, base: bigint, exportRva = DATA): void {
  const bytes = memory.map(base, 0x4000);
  const v = fields(bytes);
  let strings = STRINGS;
  const text = (s: string) => {
    const at = strings;
    bytes.set(new TextEncoder().encode(s + "\0"), at);
    strings += s.length + 1;
    return at;
  };
  v.setUint32(0x3c, 0x80, true); // e_lfanew
  v.setUint32(0x80, 0x4550, true); // "PE\0\0"
  v.setUint16(0x84, 0x8664, true); // Machine: AMD64
  v.setUint16(0x86, 2, true); // NumberOfSections
  v.setUint16(0x94, 240, true); // SizeOfOptionalHeader
  const optional = 0x98;
  v.setUint16(optional, 0x20b, true); // PE32+
  v.setUint32(optional + 56, SIZE_OF_IMAGE, true);
  v.setUint32(optional + 108, 16, true); // NumberOfRvaAndSizes
  const directory = (i: number, rva: number, size: number) => {
    v.setUint32(optional + 112 + 8 * i, rva, true);
    v.setUint32(optional + 116 + 8 * i, size, true);
  };
  directory(0, exportRva, 0x100);
  directory(1, IMPORTS, 40);
  directory(3, PDATA, 24);
  const section = (i: number, rva: number, size: number, characteristics: number) => {
    const s = optional + 240 + 40 * i;
    v.setUint32(s + 8, size, true); // VirtualSize
    v.setUint32(s + 12, rva, true); // VirtualAddress
    v.setUint32(s + 36, characteristics, true);
  };
  section(0, TEXT, 0x1000, 0x60000020); // code, execute, read
  section(1, DATA, 0x1800, 0xc0000040); // initialised data, read, write

  // Exports, names in sorted order: answer (data), helper (no .pdata entry), main (0x30 bytes
  // by .pdata), Forwarded (to another DLL), and one function exported by ordinal only.
  const functions = [TEXT, TEXT + 0x40, DATA + 0x800, DATA + 0x80, TEXT + 0x80];
  const forwarder = DATA + 0x80;
  bytes.set(new TextEncoder().encode("KERNELBASE.Forwarded\0"), forwarder);
  const named: [string, number][] = [["Forwarded", 3], ["answer", 2], ["helper", 1], ["main", 0]];
  const e = fields(bytes.subarray(DATA));
  e.setUint32(20, functions.length, true); // NumberOfFunctions
  e.setUint32(24, named.length, true); // NumberOfNames
  e.setUint32(28, DATA + 0x100, true); // AddressOfFunctions
  e.setUint32(32, DATA + 0x140, true); // AddressOfNames
  e.setUint32(36, DATA + 0x180, true); // AddressOfNameOrdinals
  functions.forEach((rva, i) => v.setUint32(DATA + 0x100 + 4 * i, rva, true));
  named.forEach(([name, ordinal], i) => {
    v.setUint32(DATA + 0x140 + 4 * i, text(name), true);
    v.setUint16(DATA + 0x180 + 2 * i, ordinal, true);
  });

  // One import descriptor: GetCurrentProcessId by name, ordinal 5, bound to kernel32's code.
  const hint = strings;
  strings += 2;
  text("GetCurrentProcessId");
  v.setUint32(IMPORTS, LOOKUP, true); // OriginalFirstThunk
  v.setUint32(IMPORTS + 12, text("KERNEL32.dll"), true); // Name
  v.setUint32(IMPORTS + 16, IAT, true); // FirstThunk
  v.setBigUint64(LOOKUP, BigInt(hint), true);
  v.setBigUint64(LOOKUP + 8, 2n ** 63n + 5n, true);
  v.setBigUint64(IAT, KERNEL32 + 0x1000n, true);
  v.setBigUint64(IAT + 8, KERNEL32 + 0x1100n, true);

  // .pdata: RUNTIME_FUNCTION { BeginAddress, EndAddress, UnwindData } for main only.
  v.setUint32(PDATA, TEXT, true);
  v.setUint32(PDATA + 4, TEXT + 0x30, true);
}

/** A fake process: the application's image and kernel32's, each at its own base. */
function fakeProcess(exportRva = DATA) {
  const modules = [
    { base: APP, path: "C:\\apps\\App.exe" },
    { base: KERNEL32, path: "C:\\Windows\\System32\\KERNEL32.DLL" },
  ];
  const pages = (base: bigint) => [
    { start: base, end: base + 0x1000n, protect: PAGE_READONLY },
    { start: base + 0x1000n, end: base + 0x2000n, protect: PAGE_EXECUTE_READ },
    { start: base + 0x2000n, end: base + 0x4000n, protect: PAGE_READWRITE },
  ];
  const regions = modules.flatMap((m) => pages(m.base));
  const none = () => 0;
  const runtime = fakeRuntime({
    os: "windows",
    arch: "x86_64",
    functions: {
      GetSystemInfo: windowsSystemInfo,
      K32EnumProcessModules: (_process: bigint, buffer: Uint8Array, size: number, needed: Uint8Array) => {
        modules.slice(0, size / 8).forEach((m, i) => fields(buffer).setBigUint64(8 * i, m.base, true));
        fields(needed).setUint32(0, 8 * modules.length, true);
        return 1;
      },
      GetModuleFileNameW: (module: bigint, buffer: Uint8Array) => {
        const path = modules.find((m) => m.base === module)?.path ?? "";
        const units = new Uint16Array(buffer.buffer, buffer.byteOffset, path.length);
        for (let i = 0; i < path.length; i++) units[i] = path.charCodeAt(i);
        return path.length;
      },
      GetProcAddress: (module: bigint, name: Uint8Array) =>
        module === APP && new TextDecoder().decode(name.subarray(0, name.indexOf(0))) === "Forwarded" ? FORWARDED : 0n,
      VirtualQuery: (address: bigint, mbi: Uint8Array) => {
        const f = fields(mbi);
        const r = regions.find((r) => address >= r.start && address < r.end);
        f.setBigUint64(0, r ? r.start : address - address % 4096n, true);
        f.setBigUint64(24, r ? r.end - r.start : 4096n, true);
        f.setUint32(32, r ? MEM_COMMIT : MEM_FREE, true);
        f.setUint32(36, r ? r.protect : 0, true);
        f.setUint32(40, r ? MEM_IMAGE : 0, true);
        return 48n;
      },
      ...Object.fromEntries([
        "GetLastError", "GetCurrentProcess", "GetCurrentProcessId", "GetModuleHandleW", "GetModuleHandleExW",
        "LoadLibraryW", "VirtualProtect", "FlushInstructionCache", "CreateFileMappingW", "MapViewOfFileEx",
        "UnmapViewOfFile", "CloseHandle", "GetTempPathW", "CreateFileW", "WriteFile", "RtlLookupFunctionEntry",
      ].map((name) => [name, none])),
    },
  });
  layImage(runtime.memory, APP, exportRva);
  layImage(runtime.memory, KERNEL32);
  return { runtime, os: windows(runtime) };
}

test("windows modules(): load order, file names, SizeOfImage in whole pages", () => {
  const { os } = fakeProcess();
  assert.deepEqual(os.modules(), [
    { name: "App.exe", path: "C:\\apps\\App.exe", base: APP, size: 0x4000 },
    { name: "KERNEL32.DLL", path: "C:\\Windows\\System32\\KERNEL32.DLL", base: KERNEL32, size: 0x4000 },
  ]);
  assert.equal(matchModule(os.modules(), "kernel32.dll", true)?.base, KERNEL32, "any case, as Windows names go");
  assert.equal(matchModule(os.modules(), "kernel32.dll", false), undefined, "ELF names are case-sensitive");
});

test("windows exports(): functions with their .pdata extent, data, a forwarder followed, ordinal-only left out", () => {
  const { os } = fakeProcess();
  const [app] = os.modules();
  assert.deepEqual(os.exports(app), [
    { name: "Forwarded", address: FORWARDED, size: 0, kind: "function", default: true },
    { name: "answer", address: APP + BigInt(DATA + 0x800), size: 0, kind: "data", default: true },
    { name: "helper", address: APP + BigInt(TEXT + 0x40), size: 0, kind: "function", default: true },
    { name: "main", address: APP + BigInt(TEXT), size: 0x30, kind: "function", default: true },
  ]);
});

test("windows imports(): each IAT slot, by name or ordinal, with the DLL its descriptor names", () => {
  const { os } = fakeProcess();
  const [app] = os.modules();
  assert.deepEqual(os.imports(app), [
    { name: "GetCurrentProcessId", slot: APP + BigInt(IAT), target: KERNEL32 + 0x1000n, kind: "iat", from: "KERNEL32.dll" },
    { name: "#5", slot: APP + BigInt(IAT + 8), target: KERNEL32 + 0x1100n, kind: "iat", from: "KERNEL32.dll" },
  ]);
});

test("windows introspection reads only committed memory: a directory pointing past the image is INVALID_ADDRESS", () => {
  const { os } = fakeProcess(0x9000);
  const [app] = os.modules();
  assertCode(() => os.exports(app), "INVALID_ADDRESS", /not committed/);
  assertCode(() => os.exports({ ...app, base: 0x5000_0000n }), "LIBRARY_NOT_FOUND", /no longer loaded/);
});
