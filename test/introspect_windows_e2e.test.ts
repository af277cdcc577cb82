/**
 * Introspection on Windows x64, for real (run under Wine by `npm run test:windows`; registers
 * nothing on other systems): the modules K32EnumProcessModules lists, kernel32's export directory
 * against GetProcAddress, the executable's import address table against what the loader bound.
 */
import { assert, test } from "./harness.ts";
import { exports, find, imports, modules } from "../mod.ts";
import { platform } from "../platform/mod.ts";

const onWindows = (globalThis as { Deno?: { build: { os: string } } }).Deno?.build.os === "windows" ||
  (globalThis as { process?: { platform: string } }).process?.platform === "win32";

if (onWindows) {
  const { runtime } = platform();
  const kernel32 = runtime.open("kernel32.dll", {
    GetModuleHandleW: { parameters: ["buffer"], result: "usize" },
    GetProcAddress: { parameters: ["usize", "buffer"], result: "usize" },
  });
  const wide = (text: string) => new Uint8Array(Uint16Array.from([...text, "\0"].map((c) => c.charCodeAt(0))).buffer);
  const procAddress = (library: string, name: string) =>
    kernel32.GetProcAddress(kernel32.GetModuleHandleW(wide(library)), new TextEncoder().encode(name + "\0")) as bigint;

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
}
