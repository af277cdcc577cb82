/**
 * Introspection of the macOS layer against a fake libSystem and Mach-O images laid out in fake
 * memory as dyld maps them (no Mac here): the images dyld lists, the export trie, the lazy and
 * non-lazy symbol pointers named through the indirect symbol table, and reads refused outside
 * readable memory.
 */
import { assert, assertCode, test } from "./harness.ts";
import { darwin } from "../platform/darwin.ts";
import { fakeRuntime, fields } from "./fake_ffi.ts";
import type { FakeMemory } from "./fake_ffi.ts";

const APP = 0x1_0000_0000n;
const LIBFOO = 0x1_8000_0000n;
const TIME = 0x7ff8_0001_0000n; // where the fake libSystem's time lives
const IMAGE_SIZE = 0x10000n;
const NAMES = 0x6000_0000n;
/** __LINKEDIT's file offset differs from its address, as in the shared cache. */
const LINKEDIT_VMADDR = 0xc000, LINKEDIT_FILEOFF = 0x20000;
const TRIE = 0x000, FUNCTION_STARTS = 0x200, SYMBOLS = 0x300, STRINGS = 0x400, INDIRECT = 0x500;

function uleb(value: number): number[] {
  const out: number[] = [];
  do {
    const low = value % 128;
    value = Math.floor(value / 128);
    out.push(value > 0 ? low + 128 : low);
  } while (value > 0);
  return out;
}

const cstr = (text: string) => [...new TextEncoder().encode(text), 0];

/**
 * The export trie: the root's one edge `_` leads to a node whose edges name `main_fn` and
 * `helper` (functions), `answer` (data), `tls_var` (thread-local) and `other` (a re-export).
 */
function exportTrie(): number[] {
  const leaf = (flags: number, ...rest: number[]) => {
    const body = [...uleb(flags), ...rest];
    return [...uleb(body.length), ...body, 0];
  };
  const leaves: [string, number[]][] = [
    ["main_fn", leaf(0, ...uleb(0x1000))],
    ["helper", leaf(0, ...uleb(0x1040))],
    ["answer", leaf(0, ...uleb(0x8100))],
    ["tls_var", leaf(1, ...uleb(0x8200))], // EXPORT_SYMBOL_FLAGS_KIND_THREAD_LOCAL
    ["other", leaf(8, ...uleb(1), 0)], // EXPORT_SYMBOL_FLAGS_REEXPORT: ordinal 1, same name
  ];
  // Offsets fit in one ULEB byte here, so the sizes are known before the offsets are.
  const root = [0, 1, ...cstr("_"), 0];
  const middleAt = root.length;
  const middleSize = 2 + leaves.reduce((n, [edge]) => n + edge.length + 2, 0);
  root[root.length - 1] = middleAt;
  const middle = [0, leaves.length];
  let at = middleAt + middleSize;
  for (const [edge, node] of leaves) {
    middle.push(...cstr(edge), at);
    at += node.length;
  }
  return [...root, ...middle, ...leaves.flatMap(([, node]) => node)];
}

/** Lays out a Mach-O image at `header` as dyld maps it (the slide is the header's address). */
function layImage(memory: FakeMemory, header: bigint, filetype: number, badTrie = false): void {
  const bytes = memory.map(header, Number(IMAGE_SIZE));
  const v = fields(bytes);
  const linkedit = (offset: number) => LINKEDIT_VMADDR + offset; // where file offset LINKEDIT_FILEOFF + offset is
  const commands: number[][] = [];
  const u32s = (...values: number[]) => values.flatMap((x) => [x & 0xff, (x >>> 8) & 0xff, (x >>> 16) & 0xff, x >>> 24]);
  const u64s = (...values: number[]) => values.flatMap((x) => [...u32s(x % 2 ** 32), ...u32s(Math.floor(x / 2 ** 32))]);
  const name16 = (text: string) => [...new TextEncoder().encode(text), ...new Array(16 - text.length).fill(0)];
  const section = (seg: string, sect: string, addr: number, size: number, flags: number, reserved1 = 0) =>
    [...name16(sect), ...name16(seg), ...u64s(addr, size), ...u32s(0, 0, 0, 0, flags, reserved1, 0, 0)];
  const segment = (name: string, vmaddr: number, vmsize: number, fileoff: number, sections: number[][]) => [
    ...u32s(0x19, 72 + 80 * sections.length), ...name16(name), ...u64s(vmaddr, vmsize, fileoff, vmsize),
    ...u32s(7, 7, sections.length, 0), ...sections.flat(),
  ];
  commands.push(segment("__TEXT", 0, 0x4000, 0, [section("__TEXT", "__text", 0x1000, 0x100, 0x80000400)]));
  commands.push(segment("__DATA_CONST", 0x4000, 0x4000, 0x4000, [section("__DATA_CONST", "__got", 0x4000, 16, 6, 0)]));
  commands.push(segment("__DATA", 0x8000, 0x4000, 0x8000, [
    section("__DATA", "__la_symbol_ptr", 0x8000, 8, 7, 2),
    section("__DATA", "__data", 0x8100, 0x200, 0),
  ]));
  commands.push(segment("__LINKEDIT", LINKEDIT_VMADDR, 0x4000, LINKEDIT_FILEOFF, []));
  const trie = exportTrie();
  commands.push(u32s(0x80000033, 16, LINKEDIT_FILEOFF + (badTrie ? 0x9000 : TRIE), trie.length)); // LC_DYLD_EXPORTS_TRIE
  commands.push(u32s(0x26, 16, LINKEDIT_FILEOFF + FUNCTION_STARTS, 8)); // LC_FUNCTION_STARTS
  commands.push(u32s(0x2, 24, LINKEDIT_FILEOFF + SYMBOLS, 2, LINKEDIT_FILEOFF + STRINGS, 0x40)); // LC_SYMTAB
  const dysymtab = new Array(80).fill(0);
  dysymtab.splice(0, 8, ...u32s(0xb, 80));
  dysymtab.splice(56, 8, ...u32s(LINKEDIT_FILEOFF + INDIRECT, 3)); // indirectsymoff, nindirectsyms
  commands.push(dysymtab);
  const dylib = cstr("/usr/lib/libSystem.B.dylib");
  const dylibSize = Math.ceil((24 + dylib.length) / 8) * 8;
  commands.push([...u32s(0xc, dylibSize, 24, 0, 0, 0), ...dylib, ...new Array(dylibSize - 24 - dylib.length).fill(0)]);
  const all = commands.flat();
  v.setUint32(0, 0xfeedfacf, true); // MH_MAGIC_64
  v.setUint32(4, 0x0100000c, true); // CPU_TYPE_ARM64
  v.setUint32(12, filetype, true);
  v.setUint32(16, commands.length, true);
  v.setUint32(20, all.length, true);
  bytes.set(all, 32);

  bytes.set(trie, linkedit(TRIE));
  bytes.set([...uleb(0x1000), ...uleb(0x40), 0], linkedit(FUNCTION_STARTS)); // main_fn, helper
  // Symbols (nlist_64): _time and _gettimeofday, undefined, bound from dylib ordinal 1.
  const strings = [0, ...cstr("_time"), ...cstr("_gettimeofday")];
  bytes.set(strings, linkedit(STRINGS));
  const symbol = (i: number, nameAt: number) => {
    const at = linkedit(SYMBOLS) + 16 * i;
    v.setUint32(at, nameAt, true);
    v.setUint8(at + 4, 0x01); // N_UNDF | N_EXT
    v.setUint16(at + 6, 1 << 8, true); // library ordinal 1
  };
  symbol(0, 1);
  symbol(1, 1 + "_time".length + 1);
  // Indirect symbols: __got[0] = _time, __got[1] a local pointer, __la_symbol_ptr[0] = _gettimeofday.
  [0, 0x80000000, 1].forEach((index, i) => v.setUint32(linkedit(INDIRECT) + 4 * i, index, true));
  v.setBigUint64(0x4000, TIME, true);
  v.setBigUint64(0x4008, header + 0x8100n, true);
  v.setBigUint64(0x8000, header + 0x1080n, true); // lazy, not bound yet: the image's own stub helper
}

function fakeMac(badTrie = false) {
  const images = [
    { header: APP, path: "/Applications/App.app/Contents/MacOS/App", filetype: 2 },
    { header: LIBFOO, path: "/usr/local/lib/libfoo.dylib", filetype: 6 },
  ];
  const none = () => 0;
  const runtime = fakeRuntime({
    os: "darwin",
    arch: "aarch64",
    functions: {
      sysconf: () => 16384n,
      mach_task_self: () => 0x203,
      getpid: () => 4321,
      _dyld_image_count: () => images.length,
      _dyld_get_image_header: (i: number) => images[i].header,
      _dyld_get_image_name: (i: number) => NAMES + BigInt(256 * i),
      mach_vm_region_recurse: (_task: number, address: Uint8Array, size: Uint8Array, depth: Uint8Array, info: Uint8Array) => {
        const at = fields(address).getBigUint64(0, true);
        const image = images.find((i) => i.header + IMAGE_SIZE > at);
        if (!image) return 1; // KERN_INVALID_ADDRESS: nothing at or above
        fields(address).setBigUint64(0, image.header, true);
        fields(size).setBigUint64(0, IMAGE_SIZE, true);
        fields(depth).setUint32(0, 0, true);
        fields(info).setUint32(0, 1, true); // VM_PROT_READ
        fields(info).setUint32(48, 0, true); // not a submap
        return 0;
      },
      ...Object.fromEntries([
        "mprotect", "mmap", "munmap", "__error", "strerror", "dlopen", "dlerror", "dlsym", "dladdr",
        "sys_icache_invalidate", "mach_vm_protect", "mach_vm_allocate", "mach_vm_deallocate", "mach_vm_remap",
        "proc_regionfilename",
      ].map((name) => [name, none])),
    },
  });
  runtime.memory.map(NAMES, 256 * images.length);
  images.forEach((image, i) => {
    runtime.memory.writeCString(NAMES + BigInt(256 * i), image.path);
    layImage(runtime.memory, image.header, image.filetype, badTrie && image.header === LIBFOO);
  });
  return { runtime, os: darwin(runtime) };
}

test("darwin modules(): dyld's images in load order, each its __TEXT segment", () => {
  const { os } = fakeMac();
  assert.deepEqual(os.modules(), [
    { name: "App", path: "/Applications/App.app/Contents/MacOS/App", base: APP, size: 0x4000 },
    { name: "libfoo.dylib", path: "/usr/local/lib/libfoo.dylib", base: LIBFOO, size: 0x4000 },
  ]);
});

test("darwin exports(): the export trie's functions (sized by LC_FUNCTION_STARTS) and data; thread-locals and re-exports left out", () => {
  const { os } = fakeMac();
  const [, libfoo] = os.modules();
  assert.deepEqual(os.exports(libfoo), [
    { name: "main_fn", address: LIBFOO + 0x1000n, size: 0x40, kind: "function", default: true },
    { name: "helper", address: LIBFOO + 0x1040n, size: 0xc0, kind: "function", default: true },
    { name: "answer", address: LIBFOO + 0x8100n, size: 0, kind: "data", default: true },
  ]);
});

test("darwin imports(): non-lazy and lazy symbol pointers named through the indirect symbol table", () => {
  const { os } = fakeMac();
  const [, libfoo] = os.modules();
  assert.deepEqual(os.imports(libfoo), [
    { name: "time", from: "/usr/lib/libSystem.B.dylib", slot: LIBFOO + 0x4000n, target: TIME, kind: "non_lazy_pointer" },
    { name: "gettimeofday", from: "/usr/lib/libSystem.B.dylib", slot: LIBFOO + 0x8000n, target: LIBFOO + 0x1080n, kind: "lazy_pointer" },
  ]);
});

test("darwin introspection reads only readable memory: a trie past the image is INVALID_ADDRESS", () => {
  const { os } = fakeMac(true);
  const [, libfoo] = os.modules();
  assertCode(() => os.exports(libfoo), "INVALID_ADDRESS", /not readable/);
  assertCode(() => os.imports({ ...libfoo, base: 0x5000_0000n }), "LIBRARY_NOT_FOUND", /no longer loaded/);
});
