/**
 * Introspection on Windows x64, for real (run under Wine by `npm run test:windows`; registers
 * nothing on other systems): the modules K32EnumProcessModules lists, kernel32's export directory
 * against GetProcAddress (forwarders where the loader leads), the executable's import address table
 * against what the loader bound, symbolAt and find over them.
 */
import { assert, test } from "./harness.ts";
import { exports, find, imports, modules, symbolAt } from "../mod.ts";
import { onWindows, win32 } from "./windows_native.ts";

if (onWindows) {
  const { procAddress } = win32();

  test("windows modules(): the executable first, kernel32 by any case, each image inside its SizeOfImage", () => {
    const all = modules();
    assert.match(all[0].name, /\.exe$/i);
    const k32 = all.find((m) => m.name.toLowerCase() === "kernel32.dll");
    assert.ok(k32, "kernel32.dll is listed");
    const address = procAddress("kernel32.dll", "GetProcAddress");
    const home = all.find((m) => address >= m.base && address < m.base + BigInt(m.size));
    assert.ok(home, "GetProcAddress lies in a listed module");
  });

  test("windows exports('KERNEL32.DLL'): GetCurrentProcessId where GetProcAddress finds it", () => {
    const found = exports("KERNEL32.DLL").find((e) => e.name === "GetCurrentProcessId");
    assert.ok(found);
    assert.equal(found.address, procAddress("kernel32.dll", "GetCurrentProcessId"));
    assert.equal(found.kind, "function");
    assert.ok(find("GetCurrentProcessId").some((d) => d.library.toLowerCase() === "kernel32.dll"));
  });

  test("windows imports(): the executable's kernel32 slots hold what GetProcAddress gives", () => {
    const fromKernel32 = imports(modules()[0].name).filter((i) => i.from?.toLowerCase() === "kernel32.dll" && !i.name.startsWith("#"));
    assert.ok(fromKernel32.length > 0, "the executable imports from kernel32.dll");
    for (const i of fromKernel32) {
      assert.equal(i.kind, "iat");
      assert.equal(i.target, procAddress("kernel32.dll", i.name), i.name);
    }
  });

  const home = (address: bigint) =>
    modules().find((m) => address >= m.base && address < m.base + BigInt(m.size))?.name.toLowerCase();

  test("windows exports(): a forwarder (kernel32's HeapAlloc) is where the loader leads, in ntdll; symbolAt names it there", () => {
    const heapAlloc = exports("kernel32.dll").find((e) => e.name === "HeapAlloc");
    assert.ok(heapAlloc);
    assert.equal(heapAlloc.address, procAddress("kernel32.dll", "HeapAlloc"));
    assert.equal(home(heapAlloc.address), "ntdll.dll", "forwarded to NTDLL.RtlAllocateHeap");
    const there = symbolAt(heapAlloc.address);
    assert.equal(there?.library.toLowerCase(), "ntdll.dll");
    assert.equal(there?.address, procAddress("ntdll.dll", there!.name));
    assert.equal(there?.offset, 0);
  });

  test("windows symbolAt(): the export holding an address inside a function, with the offset", () => {
    const address = procAddress("kernelbase.dll", "GetSystemTimeAsFileTime");
    const entry = exports("kernelbase.dll").find((e) => e.name === "GetSystemTimeAsFileTime")!;
    assert.ok(entry.size > 2, "kernelbase's function has its .pdata extent");
    assert.deepEqual(symbolAt(address + 2n), {
      library: "kernelbase.dll", path: symbolAt(address)!.path, name: "GetSystemTimeAsFileTime", address, offset: 2,
    });
    assert.equal(symbolAt(0x10n), null, "nothing is loaded there");
  });

  test("windows find(): every module exporting a name, in load order, each where its GetProcAddress says", () => {
    const found = find("GetSystemTimeAsFileTime");
    const names = found.map((d) => d.library.toLowerCase());
    assert.deepEqual(names.filter((n) => n === "kernel32.dll" || n === "kernelbase.dll"), ["kernel32.dll", "kernelbase.dll"]);
    for (const d of found) assert.equal(d.address, procAddress(d.library, d.name), d.library);
  });
}
