/**
 * Introspection against the real loader: modules, exports (with versions), import slots, the
 * symbol at an address and where a name resolves; the image reader alone on a library built in
 * memory, loaded as linked and as the loader relocates it.
 */
import { readFileSync, realpathSync } from "node:fs";
import { assert, assertCode, runtimeName, runtimePath, test } from "./harness.ts";
import { exports, find, imports, modules, redefine, RedefineError, symbolAt } from "../mod.ts";
import { dynamicInfo, exportedSymbols, importSlots, loadedSpan, programHeaders } from "../platform/image/elf_loaded.ts";
import type { Reader } from "../platform/image/elf_loaded.ts";
import { elfFunctions } from "./elf_file.ts";
import { buildImportLibrary, IMPORTS, loadImportLibrary } from "./import_library.ts";
import { isArm64, os, runtime } from "./native.ts";

const libcModule = () => modules().find((m) => m.name === "libc.so.6")!;
const generated = loadImportLibrary(runtime, os, "introspect_");
// qemu-user before 8.1 gives its guests no vDSO.
const hasVdso = os.mappings().some((m) => m.path === "[vdso]");

test("modules(): the main executable first, libc holding getpid, the vDSO, each inside the memory map", () => {
  const all = modules();
  assert.equal(all[0].path, realpathSync(runtimePath), "the main executable, by its real path");
  assert.equal(all[0].name, all[0].path.slice(all[0].path.lastIndexOf("/") + 1));
  const libc = libcModule();
  assert.ok(libc, "libc.so.6 is listed");
  const getpid = os.symbolAddress("getpid", "libc.so.6");
  assert.ok(libc.base <= getpid && getpid < libc.base + BigInt(libc.size), "getpid lies in libc's span");
  assert.equal(libc.base % BigInt(os.pageSize), 0n);
  const vdso = all.find((m) => m.path === "[vdso]");
  assert.equal(vdso !== undefined, hasVdso, "the vDSO is listed where the process has one");
  if (vdso) assert.equal(vdso.name, "linux-vdso.so.1");
  assert.ok(all.some((m) => m.path === generated.path), "a library the runtime loaded itself is listed");
  for (const m of all) {
    assert.ok(os.mappingAt(m.base) !== null, `${m.name}'s first page is mapped`);
    assert.ok(os.mappingAt(m.base + BigInt(m.size) - 1n) !== null, `${m.name}'s last page is mapped`);
  }
});

test("exports('libc.so.6'): getpid at dlsym's address with its size, environ as data", () => {
  const all = exports("libc.so.6");
  const getpid = all.filter((e) => e.name === "getpid");
  assert.equal(getpid.length, 1);
  assert.equal(getpid[0].address, os.symbolAddress("getpid", "libc.so.6"));
  assert.equal(getpid[0].kind, "function");
  assert.equal(getpid[0].default, true);
  assert.ok(getpid[0].size > 0);
  assert.equal(getpid[0].size, os.symbolAt(getpid[0].address)!.size, "the size dladdr1 reads from the same table");
  const environ = all.find((e) => e.name === "environ")!;
  assert.equal(environ.kind, "data");
  assert.equal(environ.address, os.symbolAddress("environ", "libc.so.6"));
  // An indirect function is listed where calls go, as dlsym resolves it.
  const strlen = all.find((e) => e.name === "strlen")!;
  assert.equal(strlen.address, os.symbolAddress("strlen", "libc.so.6"));
});

test("exports: the dynamic symbol table counted from DT_GNU_HASH holds every function of the file's .dynsym", () => {
  const names = new Set(exports("libc.so.6").map((e) => e.name));
  const inFile = elfFunctions(readFileSync(libcModule().path));
  assert.ok(inFile.length > 500);
  assert.deepEqual(inFile.filter((f) => !names.has(f.name)).map((f) => f.name), []);
});

test("exports: glibc's compat-only versions are marked, and dlvsym finds each at its address", () => {
  const dlvsym = runtime.open("libc.so.6", {
    dlopen: { parameters: ["buffer", "i32"], result: "usize" },
    dlvsym: { parameters: ["usize", "buffer", "buffer"], result: "usize" },
  });
  const handle = dlvsym.dlopen(new TextEncoder().encode("libc.so.6\0"), 1) as bigint;
  const cstr = (s: string) => new TextEncoder().encode(s + "\0");
  // glibc 2.34 moved pthread_create into libc: the old version stays as a compat symbol.
  const versions = exports("libc.so.6").filter((e) => e.name === "pthread_create");
  const current = versions.filter((e) => e.default);
  const compat = versions.filter((e) => !e.default);
  assert.equal(current.length, 1);
  assert.equal(current[0].version, "GLIBC_2.34");
  assert.ok(compat.length >= 1, "a compat-only pthread_create");
  for (const e of versions) assert.equal(dlvsym.dlvsym(handle, cstr(e.name), cstr(e.version!)), e.address, e.version!);
  if (!isArm64) {
    const clock = exports("libc.so.6").filter((e) => e.name === "clock_gettime");
    assert.deepEqual(clock.map((e) => [e.version, e.default]).sort(), [["GLIBC_2.17", true], ["GLIBC_2.2.5", false]]);
  }
});

test("exports of the vDSO: its dynamic section holds offsets, the symbols land inside it", () => {
  const vdso = modules().find((m) => m.path === "[vdso]")!;
  const all = exports("linux-vdso.so.1");
  assert.deepEqual(exports("[vdso]"), all, "by path as well");
  assert.ok(all.some((e) => /clock_gettime$/.test(e.name) && e.kind === "function"));
  for (const e of all) {
    assert.ok(e.address >= vdso.base && e.address < vdso.base + BigInt(vdso.size), `${e.name} inside the vDSO`);
    assert.equal(e.version, isArm64 ? "LINUX_2.6.39" : "LINUX_2.6");
  }
}, { skip: hasVdso ? undefined : "this process has no vDSO" });

test("imports(): the generated library's GOT slots, each holding what dlsym resolves", () => {
  const module = modules().find((m) => m.path === generated.path)!;
  const slots = imports(generated.path);
  assert.deepEqual(slots.map((i) => [i.name, i.kind]).sort(), IMPORTS.map((i) => [i.name, i.kind]).sort());
  for (const [i, imported] of IMPORTS.entries()) {
    const slot = slots.find((s) => s.name === imported.name)!;
    assert.equal(slot.slot, module.base + BigInt(generated.library.slotOffset(i)));
    assert.equal(slot.target, os.symbolAddress(imported.name), `${imported.name}: the address the loader bound`);
    assert.equal(new DataView(runtime.view(slot.slot, 8).slice().buffer).getBigUint64(0, true), slot.target);
  }
  assert.ok(Number(generated.time()) > 1_000_000_000, "the library's call through its slot reaches time");
  assert.deepEqual(imports(String(module.name)), slots, "by the name the loader lists");
  // A system library: every slot lies in its own image, versions come from its DT_VERNEED.
  const libm = modules().find((m) => m.name === "libm.so.6");
  if (libm) {
    const libmSlots = imports("libm.so.6");
    assert.ok(libmSlots.length > 0);
    for (const s of libmSlots) assert.ok(s.slot >= libm.base && s.slot < libm.base + BigInt(libm.size));
    assert.ok(libmSlots.some((s) => s.version?.startsWith("GLIBC_")));
  }
});

test("symbolAt(getpid + 3n): libc, the public name, offset 3; null outside every module", () => {
  const getpid = os.symbolAddress("getpid", "libc.so.6");
  assert.deepEqual(symbolAt(getpid + 3n), {
    library: "libc.so.6", path: libcModule().path, name: "getpid", address: getpid, offset: 3,
  });
  assert.equal(symbolAt(0x1000n), null);
  assertCode(() => symbolAt(-1n), "INVALID_ADDRESS");
  assertCode(() => symbolAt(2n ** 64n), "INVALID_ADDRESS");
  assertCode(() => symbolAt(5 as unknown as bigint), "INVALID_ADDRESS");
});

test("find('memcmp'): in the order RTLD_DEFAULT searches, its first hit what dlsym finds", () => {
  const found = find("memcmp");
  const executable = modules()[0];
  if (runtimeName === "bun") {
    // Bun's executable has a PLT entry standing for memcmp: the default lookup finds it first.
    assert.equal(found[0].path, executable.path);
    assert.equal(found[1].library, "libc.so.6");
  } else {
    assert.equal(found[0].library, "libc.so.6");
  }
  assert.equal(found[0].address, os.symbolAddress("memcmp"));
  assert.ok(found.every((d) => d.default));
  assert.deepEqual(find("no_such_function_anywhere"), []);
});

test("bad names: unknown, empty, or holding a NUL are typed errors", () => {
  assertCode(() => exports("libnot-loaded.so.9"), "LIBRARY_NOT_FOUND", /modules\(\)/);
  assertCode(() => imports("libc.so.6\0junk"), "LIBRARY_NOT_FOUND", /NUL/);
  assertCode(() => exports(""), "LIBRARY_NOT_FOUND");
  assertCode(() => find("getpid\0junk"), "SYMBOL_NOT_FOUND", /NUL/);
  assertCode(() => exports(42 as unknown as string), "LIBRARY_NOT_FOUND");
  const gone = { name: "gone.so", path: "/gone.so", base: 0x1000n, size: 4096 };
  assertCode(() => os.exports(gone), "LIBRARY_NOT_FOUND", /no longer loaded/);
});

/** The image as if loaded at `bias`; `relocated` adds the bias in the dynamic section as glibc does. */
function placed(bias: bigint, relocated: boolean) {
  const library = buildImportLibrary(isArm64 ? "aarch64" : "x86_64", "pure_");
  const bytes = library.bytes.slice();
  const view = new DataView(bytes.buffer);
  const headers = programHeaders((a, n) => bytes.slice(Number(a), Number(a) + n), 64n, view.getUint16(56, true));
  if (relocated) {
    const dynamic = Number(headers.find((h) => h.type === 2)!.vaddr);
    for (let at = dynamic; view.getBigUint64(at, true) !== 0n; at += 16) {
      // DT_HASH, DT_STRTAB, DT_SYMTAB, DT_RELA, DT_JMPREL: what glibc relocates in place
      if ([4n, 5n, 6n, 7n, 23n].includes(view.getBigUint64(at, true))) {
        view.setBigUint64(at + 8, view.getBigUint64(at + 8, true) + bias, true);
      }
    }
  }
  const read: Reader = (address, length) => {
    const at = address - bias;
    if (at < 0n || at + BigInt(length) > BigInt(bytes.length)) throw new Error(`read outside: ${address}`);
    return bytes.slice(Number(at), Number(at) + length);
  };
  return { library, read, image: { bias, headers } };
}

test("the image reader on a library built in memory: span, symbols, slots — as linked and relocated", () => {
  for (const [bias, relocated] of [[0n, false], [0x7f00_0000_0000n, false], [0x7f00_0000_0000n, true]] as const) {
    const { library, read, image } = placed(bias, relocated);
    assert.deepEqual(loadedSpan(image, 4096), { base: bias, size: 0x20000 + 4096 });
    const info = dynamicInfo(read, image)!;
    assert.equal(info.soname, library.soname);
    assert.equal(info.symbolCount, 1 + 2 * IMPORTS.length + 1);
    const exported = exportedSymbols(read, image, info);
    assert.deepEqual(exported.map((e) => [e.name, e.kind]), [
      ...IMPORTS.map((_, i) => [library.caller(i), "function"]),
      [library.data, "data"],
    ]);
    assert.ok(exported.every((e) => e.address > bias && !e.indirect && e.default && e.version === undefined));
    const slots = importSlots(read, image, info, isArm64 ? "aarch64" : "x86_64");
    assert.deepEqual(
      slots.map((s) => [s.name, s.kind, s.slot - bias, s.target]).sort(),
      IMPORTS.map((imported, i) => [imported.name, imported.kind, BigInt(library.slotOffset(i)), 0n]).sort(),
    );
  }
});

test("the image reader passes on the reader's refusal instead of reading past an image", () => {
  const { read, image } = placed(0n, false);
  const refusing: Reader = (address, length) => {
    if (address >= 0x10000n) throw new RedefineError("INVALID_ADDRESS", "outside");
    return read(address, length);
  };
  assertCode(() => dynamicInfo(refusing, image), "INVALID_ADDRESS");
});

test("Patch.library: the module the redefined function lives in, the vDSO for glibc's time", () => {
  {
    using patch = redefine({ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" });
    assert.equal(patch.library, "libc.so.6");
  }
  using scoped = redefine({ symbol: "time", parameters: ["pointer"], result: "i64", callers: generated.path }, () => 1n);
  const time = os.symbolAddress("time");
  assert.equal(scoped.library, modules().find((m) => time >= m.base && time < m.base + BigInt(m.size))!.name);
  if (hasVdso && !isArm64) assert.equal(scoped.library, "linux-vdso.so.1");
});
