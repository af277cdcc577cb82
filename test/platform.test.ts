import { assert, assertCode, runtimeName, runtimePath, test } from "./harness.ts";
import { redefine, RedefineError } from "../mod.ts";
import { archFor } from "../src/arch/mod.ts";
import { osFor, sameMemory } from "../platform/mod.ts";
import { linux, parseMaps } from "../platform/linux.ts";
import { farPlace, nearCandidates } from "../platform/address_space.ts";
import { lazyLibrary } from "../platform/lazy_library.ts";
import { PROTECT_FROM, writeCode } from "../src/code_memory.ts";
import type { WriteOptions } from "../src/code_memory.ts";
import { lent, liveBytes } from "../src/registry.ts";
import { platform } from "../platform/mod.ts";
import { assemble, bytesAt, isArm64, libc, os, protectionAt, runtime, unassemble, unwritableCode } from "./native.ts";
import { PROT_EXEC, PROT_READ } from "../platform/mod.ts";
import type { NativeCall, Runtime } from "../platform/mod.ts";
import { execFileSync } from "node:child_process";
import { closeSync, openSync, readdirSync, readFileSync, readlinkSync, writeFileSync, writeSync } from "node:fs";
import { buildStubImage } from "../platform/mod.ts";

test("an unsupported CPU or OS is a typed error", () => {
  assertCode(() => archFor("riscv64"), "UNSUPPORTED_PLATFORM");
  assertCode(() => osFor({ ...runtime, os: "plan9" }), "UNSUPPORTED_PLATFORM");
});

test("Deno without --allow-ffi: FFI_PERMISSION naming the flag", () => {
  const script = `import { redefine } from "${new URL("../mod.ts", import.meta.url).href}";
try { redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => 1); }
catch (e) { console.log(e.code + ": " + e.message); }`;
  // The Deno running the tests (an arm64 one under emulation); from Bun, the project's Deno.
  const deno = runtimeName === "deno" ? runtimePath : new URL("../node_modules/.bin/deno", import.meta.url).pathname;
  // `deno run -` reads the program from stdin and, unlike `deno eval`, grants nothing by default.
  const out = execFileSync(deno, ["run", "--no-check", "--allow-read", "-"], { input: script, encoding: "utf8" });
  assert.match(out, /^FFI_PERMISSION: .*--allow-ffi/);
});

test("/proc/self/maps parsing and the choice of near free space", () => {
  const maps = parseMaps(
    "55d0a000-55d0b000 r-xp 00000000 08:01 42 /usr/bin/x\n" +
      "7f0000000000-7f0000010000 r--p 00000000 00:00 0 \n" +
      "7f0000020000-7f0000030000 rw-p 00000000 00:00 0 [heap]\n" +
      "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n",
  );
  assert.equal(maps.length, 4);
  assert.deepEqual(maps[0], {
    start: 0x55d0a000n, end: 0x55d0b000n, protection: 5, path: "/usr/bin/x",
    file: { device: 0x800001, inode: 42, base: 0x55d0a000n },
  });
  assert.equal(maps[1].file, undefined, "anonymous memory maps no file");
  assert.equal(maps[2].path, "[heap]");
  const page = 0x1000n;
  // Near 0x7f0000008000: the gap just above the first mapping, then the one just below it.
  const found = nearCandidates(maps, 0x7f0000008000n, 2n ** 31n, page, page);
  assert.equal(found[0], 0x7f0000010000n);
  assert.ok(found.includes(0x7f0000030000n));
  for (const at of found) {
    assert.ok(at + page - 0x7f0000008000n <= 2n ** 31n && 0x7f0000008000n - at <= 2n ** 31n, "all within reach");
  }
  // Nothing right below the stack: its growth room is kept free.
  const nearStack = nearCandidates(maps, 0x7ffd00010000n, 2n ** 20n, page, page);
  assert.ok(nearStack.every((a) => a >= 0x7ffd00021000n), nearStack.map((a) => a.toString(16)).join());
});

if (runtime.os === "linux") {
  test("a mapping's file as mappingAt gives it (PROCMAP_QUERY where the kernel has it) is the one /proc/self/maps lists", () => {
    const labs = os.symbolAddress("labs");
    const listed = os.mappings().find((m) => labs >= m.start && labs < m.end)!;
    assert.ok(listed.file && listed.file.inode > 0, "libc's code maps its file");
    assert.deepEqual(os.mappingAt(labs)!.file, listed.file);
  });

  test("mappingAt(address, was): `was` itself while the map says exactly that of it (a file's mapping, anonymous code), a new answer once anything differs", () => {
    const labs = os.symbolAddress("labs");
    const text = os.mappingAt(labs)!;
    assert.equal(os.mappingAt(labs, text), text, "libc's text, unchanged");
    const code = assemble([0xc3]);
    try {
      const was = os.mappingAt(code.address)!;
      assert.equal(os.mappingAt(code.address, was), was, "anonymous code, unchanged");
      for (const changed of [
        { ...was, protection: PROT_READ },
        { ...was, start: was.start - 4096n },
        { ...was, end: was.end + 4096n },
        { ...was, file: { device: 1, inode: 2, base: was.start } },
      ]) {
        const now = os.mappingAt(code.address, changed)!;
        assert.notEqual(now, changed);
        assert.deepEqual(now, was, "what the map says now");
      }
      for (const changed of [
        { ...text, file: { ...text.file!, inode: text.file!.inode + 1 } },
        { ...text, file: { ...text.file!, device: text.file!.device + 1 } },
        { ...text, file: { ...text.file!, base: text.file!.base + 4096n } },
        { ...text, file: undefined },
      ]) {
        const now = os.mappingAt(labs, changed)!;
        assert.notEqual(now, changed);
        assert.deepEqual(now, text);
      }
    } finally {
      unassemble(code.base);
    }
  });
}

test("sameMemory: a file's mapping is the same file from the same place, however split; other memory the same extent and protection", () => {
  const [text, split, moved, other, anonymous, grown, writable] = parseMaps(
    "7f0000000000-7f0000004000 r-xp 00001000 08:01 42 /usr/lib/libx.so\n" +
      // The same file from the same place, split by a protection change: base 7f0000000000 - 1000.
      "7f0000002000-7f0000004000 r-xp 00003000 08:01 42 /usr/lib/libx.so\n" +
      "7f0000000000-7f0000004000 r-xp 00002000 08:01 42 /usr/lib/libx.so\n" +
      "7f0000000000-7f0000004000 r-xp 00001000 08:01 43 /usr/lib/liby.so\n" +
      "7f0000000000-7f0000004000 r-xp 00000000 00:00 0 \n" +
      "7f0000000000-7f0000008000 r-xp 00000000 00:00 0 \n" +
      "7f0000000000-7f0000004000 rwxp 00000000 00:00 0 \n",
  );
  assert.equal(sameMemory(text, split), true);
  assert.equal(sameMemory(text, moved), false, "another offset of the file at the same address");
  assert.equal(sameMemory(text, other), false, "another file");
  assert.equal(sameMemory(text, anonymous), false, "no file");
  assert.equal(sameMemory(anonymous, { ...anonymous }), true);
  assert.equal(sameMemory(anonymous, grown), false);
  assert.equal(sameMemory(anonymous, writable), false);
});

test("near free space: nearest first across the gaps below and above, up to a limit", () => {
  const page = 0x1000n;
  const maps = parseMaps(
    "100000-200000 r-xp 00000000 08:01 42 /a\n" +
      "204000-300000 r-xp 00000000 08:01 42 /b\n" +
      "301000-400000 r-xp 00000000 08:01 42 /c\n",
  );
  // Near 0x300800: the one-page gap it is in (0x300000), the top of the gap below /b, then above /c.
  const found = nearCandidates(maps, 0x300800n, 2n ** 31n, page, page);
  assert.deepEqual(found.slice(0, 3), [0x300000n, 0x203000n, 0x400000n]);
  const distance = (a: bigint) => (a > 0x300800n ? a - 0x300800n : 0x300800n - a);
  for (let i = 1; i < found.length; i++) assert.ok(distance(found[i - 1]!) <= distance(found[i]!), "nearest first");
  assert.deepEqual(nearCandidates(maps, 0x300800n, 2n ** 31n, page, page, 2), found.slice(0, 2));
  // Anywhere: the lowest place there is.
  assert.equal(farPlace(maps, page, page), 0x10000n);
});

test("a lazily bound library binds a group on the first use of one of its symbols, once", () => {
  const opened: string[][] = [];
  const counting: Runtime = {
    ...runtime,
    open(path, symbols) {
      opened.push(Object.keys(symbols));
      return runtime.open(path, symbols);
    },
  };
  const c = lazyLibrary(counting, "libc.so.6", {
    ids: { getpid: { parameters: [], result: "i32" }, getppid: { parameters: [], result: "i32" } },
    other: { labs: { parameters: ["i64"], result: "i64" } },
  });
  assert.deepEqual(opened, []);
  assert.equal(c.getpid(), process.pid);
  assert.equal(c.getppid(), process.ppid);
  assert.deepEqual(opened, [["getpid", "getppid"]]);
  assert.equal(c.labs(-3n), 3n);
  assert.deepEqual(opened, [["getpid", "getppid"], ["labs"]]);
  // A symbol the library lacks fails where it is first read, as a typed error.
  const missing = lazyLibrary(runtime, "libc.so.6", { g: { no_such_symbol_here: { parameters: [], result: "i32" } } });
  assert.throws(() => missing.no_such_symbol_here, RedefineError);
});

test("lazy library: seldom symbols through their addresses where pointer calls are slow (busy-later ones until busy, bound when the caller says), else bound", () => {
  for (const slowPointerCalls of [true, false]) {
    const opened: string[][] = [];
    const pointers: bigint[] = [];
    const asked: string[] = [];
    const deferred: (() => void)[] = [];
    const counting: Runtime = {
      ...runtime,
      slowPointerCalls,
      open(path, symbols) {
        opened.push(Object.keys(symbols));
        return runtime.open(path, symbols);
      },
      fnPointer(address, signature) {
        pointers.push(address);
        return runtime.fnPointer(address, signature);
      },
    };
    const c = lazyLibrary(counting, "libc.so.6", {
      ids: { getpid: { parameters: [], result: "i32" }, getppid: { parameters: [], result: "i32" } },
      other: { labs: { parameters: ["i64"], result: "i64" } },
      busy: { imaxabs: { parameters: ["i64"], result: "i64" } },
    }, {
      names: ["getppid", "labs"],
      busyLater: ["imaxabs"],
      defer: (bind) => deferred.push(bind),
      address: (symbol) => (asked.push(symbol), os.symbolAddress(symbol, "libc.so.6")),
    });
    assert.equal(c.getppid(), process.ppid);
    assert.equal(c.getppid(), process.ppid);
    assert.equal(c.getpid(), process.pid);
    assert.equal(c.labs(-3n), 3n);
    const openedBefore = opened.length;
    // A busy-later one: through its address, its binding handed over at the 16th call and run
    // only when the caller runs it (not from inside a call: that may be one of a patch's stores);
    // every call answered, before and after.
    for (let i = 1; i <= 20; i++) {
      assert.equal(c.imaxabs(BigInt(-i)), BigInt(i));
      assert.equal(deferred.length, slowPointerCalls && i >= 16 ? 1 : 0, `after ${i} calls`);
      assert.equal(opened.length, openedBefore + (slowPointerCalls ? 0 : 1), `after ${i} calls`);
    }
    for (const bind of deferred.splice(0)) bind();
    assert.equal(c.imaxabs(-21n), 21n);
    if (slowPointerCalls) {
      // Each seldom one found and made callable once; the rest of its group bound without it.
      assert.deepEqual(asked, ["getppid", "labs", "imaxabs"]);
      const at = (name: string) => os.symbolAddress(name, "libc.so.6");
      assert.deepEqual(pointers, [at("getppid"), at("labs"), at("imaxabs")]);
      assert.deepEqual(opened, [["getpid"], ["imaxabs"]]);
    } else {
      assert.deepEqual(asked, []);
      assert.deepEqual(pointers, []);
      assert.deepEqual(opened, [["getpid", "getppid"], ["labs"], ["imaxabs"]]);
    }
  }
});

test("lazy library: a busy-later symbol whose binding fails, by any error, stays a call through its address", () => {
  // The binding runs as the registry's section ends (Os.runDeferred): an error thrown there would
  // replace the section's outcome, a patch made and never handed back.
  for (const refusal of [new RedefineError("FFI_PERMISSION", "refused by the test"), new TypeError("refused by the test")]) {
    const deferred: (() => void)[] = [];
    const refusing: Runtime = {
      ...runtime,
      slowPointerCalls: true,
      open() {
        throw refusal;
      },
    };
    const c = lazyLibrary(refusing, "libc.so.6", { busy: { imaxabs: { parameters: ["i64"], result: "i64" } } }, {
      names: [],
      busyLater: ["imaxabs"],
      defer: (bind) => deferred.push(bind),
      address: (symbol) => os.symbolAddress(symbol, "libc.so.6"),
    });
    for (let i = 1; i <= 16; i++) assert.equal(c.imaxabs(BigInt(-i)), BigInt(i));
    assert.equal(deferred.length, 1);
    deferred[0]!();
    assert.equal(c.imaxabs(-17n), 17n, refusal.name);
  }
});

test("lazy library: a seldom or busy-later name that no group declares is a type error (deno check, tsc)", () => {
  const groups = { ids: { getpid: { parameters: [], result: "i32" } } } as const;
  const address = (symbol: string) => os.symbolAddress(symbol, "libc.so.6");
  // @ts-expect-error: misspelt, so no group's symbol
  lazyLibrary(runtime, "libc.so.6", groups, { names: ["getpdi"], address });
  // @ts-expect-error: misspelt, so no group's symbol
  lazyLibrary(runtime, "libc.so.6", groups, { names: [], busyLater: ["getpdi"], defer: (bind) => bind(), address });
  const c = lazyLibrary(runtime, "libc.so.6", groups, { names: ["getpid"], address });
  assert.equal(c.getpid(), process.pid);
});

/**
 * The two ways a write is made, for each failure case: with views and bytes of its own, as a
 * caller writing seldom makes it, and lent the registry's kept page views and scratch bytes, as
 * every patch makes it (src/registry.ts `lent`): an undo reads and puts back through whichever
 * views the write used, and lent scratch bytes come with any contents.
 */
const LENDINGS: readonly (readonly [string, WriteOptions])[] = [["", {}], [", lent the registry's page views and scratch", { lent }]];

for (const [lending, options] of LENDINGS) {
  test(`a write that fails half-way rolls back every page and byte${lending}`, () => {
    const p = platform();
    const labs = os.symbolAddress("labs");
    const unwritable = unwritableCode(); // mprotect refuses to make it writable
    const before = bytesAt(labs, 8);
    const protection = protectionAt(labs);
    try {
      assertCode(
        () => writeCode(p, [{ address: labs, bytes: new Uint8Array(8).fill(0xcc) }, { address: unwritable, bytes: Uint8Array.of(0xcc) }], options),
        "PROTECT_FAILED",
      );
    } finally {
      libc.munmap(unwritable, BigInt(os.pageSize));
    }
    assert.deepEqual(bytesAt(labs, 8), before);
    assert.equal(protectionAt(labs), protection);
  });
}

test("a write through the registry's kept page views still checks each page against the map: one unmapped since its view was kept is refused, not read", () => {
  const p = platform();
  const page = unwritableCode();
  // The registry keeps a view of the page; the writes it makes read through it.
  assert.equal(liveBytes(page, 8).length, 8);
  libc.munmap(page, BigInt(os.pageSize));
  // Read through the kept view, the unmapped page would crash the process.
  assertCode(() => writeCode(p, [{ address: page, bytes: Uint8Array.of(0xc3) }], { lent }), "INVALID_ADDRESS", /is not mapped: nothing was written/);
  assertCode(() => writeCode(p, [{ address: page + 8n, bytes: Uint8Array.of(0xc3) }, { address: page, bytes: Uint8Array.of(0xc3) }], { lent }), "INVALID_ADDRESS");
});

/**
 * The Linux layer over a runtime whose libc refuses what `refuse` says (`short`: a pwrite across a
 * page boundary stops at it, as when the next page refuses); counts the calls that change code:
 * `mprotect`, and `pwrite` (to /proc/self/mem, the only file the layer pwrites), and the mapping
 * queries (`ioctl`: PROCMAP_QUERY).
 */
function refusingLinux(refuse: { open?: boolean; pwrite?: boolean; short?: boolean; mprotect?: boolean }) {
  const calls = { mprotect: 0, pwrite: 0, openProcMem: 0, ioctl: 0 };
  const wrapped: Runtime = {
    ...runtime,
    // Every symbol bound through `open` below, where the wrapper sees it: none called through its
    // address (platform/lazy_library.ts's seldom symbols under Deno).
    slowPointerCalls: false,
    open(path, symbols) {
      const lib = runtime.open(path, symbols) as Record<string, NativeCall>;
      if (path !== "libc.so.6") return lib as never;
      const { open, pwrite, mprotect, ioctl } = lib;
      return {
        ...lib,
        open: (name: Uint8Array, flags: number) => {
          const procMem = new TextDecoder().decode(name) === "/proc/self/mem\0";
          if (procMem) calls.openProcMem++;
          return procMem && refuse.open ? -1 : open(name, flags);
        },
        pwrite: (fd: number, bytes: Uint8Array, length: bigint, at: bigint) => {
          calls.pwrite++;
          if (refuse.pwrite) return -1;
          const page = BigInt(os.pageSize);
          const room = page - at % page;
          return refuse.short && length > room ? pwrite(fd, bytes, room, at) : pwrite(fd, bytes, length, at);
        },
        mprotect: (...args: unknown[]) => (calls.mprotect++, refuse.mprotect ? -1 : mprotect(...args)),
        ioctl: (...args: unknown[]) => (calls.ioctl++, ioctl(...args)),
      } as never;
    },
  };
  return { platform: { runtime, os: linux(wrapped) }, calls };
}

/** The mappings around `address` (the one holding it and its neighbours), as text. */
function mapsAround(address: bigint): string[] {
  const all = os.mappings();
  const i = all.findIndex((m) => address >= m.start && address < m.end);
  return all.slice(Math.max(0, i - 1), i + 2).map((m) => `${m.start.toString(16)}-${m.end.toString(16)} ${m.protection} ${m.path}`);
}

// Forced writes are the x86-64 path (platform/linux.ts says why not arm64); there the kernel
// takes them unless it is hardened against them. Linux takes them only where mprotect is refused
// (`Os.protectFrom`: they tear under threads running the code); the cases below that test the
// forced way itself ask for it below PROTECT_FROM stores, as other systems' layers may.
if (!isArm64 && runtime.os === "linux") {
  /** The forced way below PROTECT_FROM stores on a run of pages, whatever the layer's own choice. */
  const FORCED: WriteOptions = { protectFrom: PROTECT_FROM };

  test("Linux writes every store into code the mprotect way, forced writes only where mprotect is refused: a lone write is one pair, no pwrite", () => {
    const { platform: counting, calls } = refusingLinux({});
    assert.equal(counting.os.protectFrom, 1, "the layer asks for the protection way from one store");
    const { code, call } = smallFunctions(1);
    const protection = protectionAt(code.address);
    const maps = mapsAround(code.address);
    const word = bytesAt(code.address, 8);
    const seven = Uint8Array.of(0xb8, 7, 0, 0, 0, 0xc3, 0xcc, 0xcc); // mov eax, 7; ret
    try {
      for (const options of [{}, { lent }]) {
        writeCode(counting, [{ address: code.address, bytes: seven }], options);
        assert.equal(call(0), 7n, "the new code runs");
        assert.equal(protectionAt(code.address), protection, "its protection back");
        writeCode(counting, [{ address: code.address, bytes: word }], options);
        assert.deepEqual(bytesAt(code.address, 8), word, "back exactly");
        assert.equal(call(0), 5n);
      }
      assert.equal(calls.mprotect, 8, "a writable-and-back pair per write");
      assert.equal(calls.pwrite, 0, "no forced write");
      assert.deepEqual(mapsAround(code.address), maps, "the same mappings, the same protections");
    } finally {
      unassemble(code.base);
    }
  });

  test("code is written through /proc/self/mem when asked to: no mprotect, and no mapping changes protection or splits", () => {
    const { platform: counting, calls } = refusingLinux({});
    const labs = os.symbolAddress("labs");
    const original = bytesAt(labs, 8);
    const maps = mapsAround(labs);
    const patched = Uint8Array.of(0x48, 0x89, 0xf8, 0xc3, 0xcc, 0xcc, 0xcc, 0xcc); // mov rax, rdi; ret
    writeCode(counting, [{ address: labs, bytes: patched }], FORCED);
    try {
      assert.deepEqual(bytesAt(labs, 8), patched);
      assert.equal(libc.labs(-5n), -5n, "the new code runs");
      assert.deepEqual(mapsAround(labs), maps, "the same mappings, the same protections");
    } finally {
      writeCode(counting, [{ address: labs, bytes: original }], FORCED);
    }
    assert.deepEqual(bytesAt(labs, 8), original, "restored exactly");
    assert.equal(libc.labs(-5n), 5n);
    assert.deepEqual(mapsAround(labs), maps);
    assert.equal(calls.mprotect, 0, "no protection was changed");
    assert.equal(calls.openProcMem, 1, "/proc/self/mem is opened once");
    assert.equal(calls.pwrite, 3, "the probe, then one pwrite per aligned word");
  });

  /** `count` functions `mov rax, rdi; ret` 16 bytes apart on one page, and the writes making each return 7. */
  function smallFunctions(count: number) {
    const code = assemble(Array.from({ length: count }, () => [0x48, 0x89, 0xf8, 0xc3, ...Array(12).fill(0xcc)]).flat());
    const addresses = Array.from({ length: count }, (_, i) => code.address + BigInt(16 * i));
    const sevens = addresses.map((address) => ({ address, bytes: Uint8Array.of(0xb8, 7, 0, 0, 0, 0xc3, 0xcc, 0xcc) })); // mov eax, 7; ret
    const originals = addresses.map((address) => ({ address, bytes: bytesAt(address, 8) }));
    const call = (i: number) => runtime.fnPointer(addresses[i]!, { parameters: ["i64"], result: "i64" })(5n);
    return { code, addresses, sevens, originals, call };
  }

  test(`asked for forced writes below ${PROTECT_FROM} stores on a run of pages, a batch takes them, one mprotect pair from there on`, () => {
    const { platform: counting, calls } = refusingLinux({});
    const { code, addresses, sevens, originals, call } = smallFunctions(PROTECT_FROM);
    const maps = mapsAround(code.address);
    const protection = protectionAt(code.address);
    try {
      const few = PROTECT_FROM - 1;
      writeCode(counting, sevens.slice(0, few), FORCED);
      assert.equal(call(0), 7n, "the new code runs");
      writeCode(counting, originals.slice(0, few), FORCED);
      assert.equal(calls.mprotect, 0, "no protection was changed");
      assert.equal(calls.pwrite, 1 + 2 * few, "the probe, then one pwrite per store");
      writeCode(counting, sevens, FORCED);
      assert.deepEqual(addresses.map((_, i) => call(i)), addresses.map(() => 7n));
      assert.equal(protectionAt(code.address), protection, "its protection back after the batch");
      writeCode(counting, originals, FORCED);
      assert.equal(calls.mprotect, 4, "one writable-and-back pair per batch");
      assert.equal(calls.pwrite, 1 + 2 * few, "no pwrite on that way");
      assert.deepEqual(addresses.map((a) => bytesAt(a, 8)), originals.map((o) => o.bytes), "restored exactly");
      assert.equal(call(0), 5n);
      assert.deepEqual(mapsAround(code.address), maps, "the same mappings, the same protections");
    } finally {
      unassemble(code.base);
    }
  });

  test("a forced write given its mapping asks the system nothing; on the mprotect way the protection is asked again", () => {
    const { platform: counting, calls } = refusingLinux({});
    const { code, sevens, originals, call } = smallFunctions(PROTECT_FROM);
    const mapping = os.mappingAt(code.address)!;
    try {
      writeCode(counting, [{ ...sevens[0]!, mapping }], FORCED);
      assert.equal(call(0), 7n);
      assert.equal(calls.ioctl, 0, "no mapping query");
      writeCode(counting, [{ ...originals[0]!, mapping }], FORCED);
      // A mapping whose protection is not the page's: the protection given back is the page's own.
      const stale = { ...mapping, protection: PROT_READ };
      writeCode(counting, sevens.map((w) => ({ ...w, mapping: stale })));
      assert.ok(calls.ioctl > 0, "asked before changing the protection");
      assert.equal(protectionAt(code.address), PROT_READ | PROT_EXEC);
      assert.equal(call(0), 7n);
      writeCode(counting, originals.map((w) => ({ ...w, mapping: stale })));
      assert.equal(protectionAt(code.address), PROT_READ | PROT_EXEC);
      assert.equal(call(0), 5n);
    } finally {
      unassemble(code.base);
    }
  });

  test("a lone write within one aligned word, lent and given its mapping, asked for forced writes: one forced write of the word, its other bytes kept; refused, the mprotect way", () => {
    const { code, call } = smallFunctions(1);
    const mapping = os.mappingAt(code.address)!;
    const protection = protectionAt(code.address);
    const maps = mapsAround(code.address);
    // mov rax, rdi; ret -> mov al, 7 ... : bytes 1-2 of the word, the others as they were.
    const word = bytesAt(code.address, 8);
    const write = { address: code.address + 1n, bytes: Uint8Array.of(0xc7, 0xc0), mapping };
    const undo = { address: code.address + 1n, bytes: word.slice(1, 3), mapping };
    const expected = word.slice();
    expected.set(write.bytes, 1);
    try {
      const { platform: counting, calls } = refusingLinux({});
      writeCode(counting, [write], { lent, ...FORCED });
      assert.deepEqual(bytesAt(code.address, 8), expected, "the two bytes, the word's other six as they were");
      writeCode(counting, [undo], { lent, ...FORCED });
      assert.deepEqual(bytesAt(code.address, 8), word, "back exactly");
      assert.equal(call(0), 5n);
      assert.deepEqual(calls, { mprotect: 0, pwrite: 1 + 2, openProcMem: 1, ioctl: 0 }, "the probe, then one pwrite each; no query");
      assert.deepEqual(mapsAround(code.address), maps, "the same mappings, the same protections");
      // Where the kernel refuses forced writes: the page is made writable and given its own protection back.
      const { platform: refused, calls: refusedCalls } = refusingLinux({ pwrite: true });
      writeCode(refused, [write], { lent, ...FORCED });
      assert.deepEqual(bytesAt(code.address, 8), expected);
      assert.equal(protectionAt(code.address), protection);
      writeCode(refused, [undo], { lent, ...FORCED });
      assert.deepEqual(bytesAt(code.address, 8), word);
      assert.equal(refusedCalls.mprotect, 4, "one pair each");
      assert.ok(refusedCalls.ioctl > 0, "the protection asked of the system before it is changed");
      assert.equal(protectionAt(code.address), protection);
    } finally {
      unassemble(code.base);
    }
  });

  test("glibc's time, in the vDSO: redefined through /proc/self/mem, and restored", () => {
    const address = os.symbolAddress("time");
    const vdso = os.mappings().find((m) => m.path === "[vdso]")!;
    assert.ok(address >= vdso.start && address < vdso.end, "glibc's time resolves into the vDSO");
    const own = runtime.open("libc.so.6", { time: { parameters: ["pointer"], result: "i64" } });
    const bytes = bytesAt(address, 32);
    const maps = mapsAround(address);
    const patch = redefine({ symbol: "time", parameters: ["pointer"], result: "i64" }, () => 1234n);
    try {
      assert.equal(patch.address, address);
      assert.equal(BigInt(own.time(0n)), 1234n, "the program's own FFI call of time(NULL)");
      assert.deepEqual(mapsAround(address), maps, "the vDSO keeps its protection");
    } finally {
      patch.restore();
    }
    const now = BigInt(own.time(0n));
    const real = BigInt(Math.floor(Date.now() / 1000));
    assert.ok(now >= real - 5n && now <= real + 5n, `the real time again (${now}, ${real})`);
    assert.deepEqual(bytesAt(address, 32), bytes, "the vDSO's bytes restored exactly");
    assert.deepEqual(mapsAround(address), maps);
  });

  for (const [lending, options] of LENDINGS) {
    test(`a batch whose run of pages mprotect refuses goes the forced way instead${lending}`, () => {
      const { platform: refused, calls } = refusingLinux({ mprotect: true });
      const { code, addresses, sevens, originals, call } = smallFunctions(PROTECT_FROM);
      const protection = protectionAt(code.address);
      try {
        writeCode(refused, sevens, options);
        assert.deepEqual(addresses.map((_, i) => call(i)), addresses.map(() => 7n));
        assert.equal(calls.mprotect, 1, "asked once");
        assert.equal(calls.pwrite, 1 + PROTECT_FROM, "the probe, then one pwrite per store");
        writeCode(refused, originals, options);
        assert.deepEqual(addresses.map((a) => bytesAt(a, 8)), originals.map((o) => o.bytes), "restored exactly");
        assert.equal(protectionAt(code.address), protection);
      } finally {
        unassemble(code.base);
      }
    });

    test(`a batch on the mprotect way that fails half-way rolls back every byte and protection${lending}`, () => {
      const { code, addresses, sevens, originals } = smallFunctions(PROTECT_FROM);
      const unwritable = unwritableCode(); // the forced write and mprotect both refuse it
      const maps = mapsAround(code.address);
      try {
        assertCode(() => writeCode(platform(), [...sevens, { address: unwritable, bytes: Uint8Array.of(0xcc) }], options), "PROTECT_FAILED");
        assert.deepEqual(addresses.map((a) => bytesAt(a, 8)), originals.map((o) => o.bytes), "every byte back");
        assert.deepEqual(mapsAround(code.address), maps, "every protection back, no mapping split");
      } finally {
        libc.munmap(unwritable, BigInt(os.pageSize));
        unassemble(code.base);
      }
    });

    test(`where the kernel refuses /proc/self/mem, forced writes fall back to mprotect; decided once${lending}`, () => {
      const forced = { ...options, ...FORCED };
      for (const refuse of [{ open: true }, { pwrite: true }]) {
        const { platform: refused, calls } = refusingLinux(refuse);
        const labs = os.symbolAddress("labs");
        const original = bytesAt(labs, 8);
        const protection = protectionAt(labs);
        const patched = Uint8Array.of(0x48, 0x89, 0xf8, 0xc3, 0xcc, 0xcc, 0xcc, 0xcc); // mov rax, rdi; ret
        writeCode(refused, [{ address: labs, bytes: patched }], forced);
        assert.deepEqual(bytesAt(labs, 8), patched, JSON.stringify(refuse));
        assert.equal(libc.labs(-5n), -5n);
        writeCode(refused, [{ address: labs, bytes: original }], forced);
        assert.deepEqual(bytesAt(labs, 8), original, "restored exactly");
        assert.equal(protectionAt(labs), protection, "its protection back exactly");
        assert.equal(calls.mprotect, 4, "a writable-and-back pair per write");
        assert.equal(calls.openProcMem, 1, "tried once");
        assert.equal(calls.pwrite, refuse.pwrite ? 1 : 0, "the probe only");
      }
    });

    test(`a forced write the kernel takes only part of is undone, and the write goes the mprotect way${lending}`, () => {
      const forced = { ...options, ...FORCED };
      const { platform: short, calls } = refusingLinux({ short: true });
      // Eight bytes from three before the end of a read+execute page into the next one.
      const { address, base } = assemble([0x90, 0x90, 0x90, 0xc3, 0xcc, 0xcc, 0xcc, 0xcc], -3);
      try {
        const before = bytesAt(address, 8);
        const protection = protectionAt(address);
        const bytes = Uint8Array.of(0x31, 0xc0, 0x90, 0xc3, 0xcc, 0xcc, 0xcc, 0xcc); // xor eax, eax; nop; ret
        writeCode(short, [{ address, bytes }], forced);
        assert.deepEqual(bytesAt(address, 8), bytes);
        assert.equal(protectionAt(address), protection);
        assert.equal(protectionAt(address + 7n), protection);
        assert.equal(calls.pwrite, 3, "the probe, the short write, the write-back of its first part");
        assert.equal(calls.mprotect, 2, "both pages opened and closed as one run");
        writeCode(short, [{ address, bytes: before }], forced);
        assert.deepEqual(bytesAt(address, 8), before, "restored exactly");
        // With mprotect refused as well, nothing stays written: not even the part the kernel took.
        const { platform: neither } = refusingLinux({ short: true, mprotect: true });
        assertCode(() => writeCode(neither, [{ address, bytes }], forced), "PROTECT_FAILED", /the kernel took 3/);
        assert.deepEqual(bytesAt(address, 8), before, "the first part written back");
      } finally {
        unassemble(base);
      }
    });

    test(`PROTECT_FAILED only where mprotect and /proc/self/mem both refuse, naming both and { callers }${lending}`, () => {
      // The vDSO with /proc/self/mem refused: mprotect's EINVAL is what is left.
      const { platform: refused } = refusingLinux({ open: true });
      const time = os.symbolAddress("time");
      const bytes = bytesAt(time, 8);
      assertCode(
        () => writeCode(refused, [{ address: time, bytes: Uint8Array.of(0xc3) }], options),
        "PROTECT_FAILED",
        /EINVAL.*opening \/proc\/self\/mem failed.*\{ callers \}/s,
      );
      assert.deepEqual(bytesAt(time, 8), bytes);
      // A shared read-only file mapping: the kernel copies nothing for it, and mprotect says EACCES.
      const unwritable = unwritableCode();
      try {
        const before = bytesAt(unwritable, 8);
        assertCode(
          () => writeCode(platform(), [{ address: unwritable, bytes: Uint8Array.of(0xc3) }], options),
          "PROTECT_FAILED",
          /EACCES.*through \/proc\/self\/mem was refused: EIO.*\{ callers \}/s,
        );
        assert.deepEqual(bytesAt(unwritable, 8), before);
        assert.equal(protectionAt(unwritable), PROT_READ | PROT_EXEC);
      } finally {
        libc.munmap(unwritable, BigInt(os.pageSize));
      }
    });
  }
}

if (runtime.os === "linux") {
  test("no writable alias of our code: the stub library's memfd is sealed, the code pool keeps no descriptor", () => {
    const image = buildStubImage({
      machine: isArm64 ? "aarch64" : "x86_64",
      count: 2,
      prefix: "redefine_sealed_test_",
      stubSize: 16,
      jump: () => new Uint8Array(isArm64 ? [0x00, 0x00, 0x20, 0xd4] : [0xcc]), // brk #0 / int3: never called
    });
    const path = os.loadableImage(image.bytes);
    assert.match(path, /^\/proc\/self\/fd\/\d+$/);
    assert.ok(os.symbolAddress(image.name(1), path) > 0n, "the loader still opens it");
    assert.throws(() => writeFileSync(path, "x"), { code: "EPERM" });
    const fd = openSync(path, "r+");
    try {
      assert.throws(() => writeSync(fd, Uint8Array.of(0xcc), 0, 1, 0x40), { code: "EPERM" });
    } finally {
      closeSync(fd);
    }
    assert.deepEqual(new Uint8Array(readFileSync(path)), image.bytes, "the file holds what was written");

    // A patch that needs the code pool; then no descriptor of the process names its memfd.
    const patch = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => x);
    try {
      const links = readdirSync("/proc/self/fd").map((n) => {
        try {
          return readlinkSync(`/proc/self/fd/${n}`);
        } catch {
          return "";
        }
      });
      assert.ok(links.some((l) => l.startsWith("/memfd:redefine-stubs")), links.join(" "));
      assert.ok(!links.some((l) => l.startsWith("/memfd:redefine-code")), links.join(" "));
    } finally {
      patch.restore();
    }
  });
}

if (runtime.os === "linux") {
  test("symbol names reach dlsym exactly: ASCII after a longer name, non-ASCII (UTF-8), longer than the name buffer", () => {
    const stubs = (prefix: string) => {
      const image = buildStubImage({
        machine: isArm64 ? "aarch64" : "x86_64",
        count: 1,
        prefix,
        stubSize: 16,
        jump: () => new Uint8Array(isArm64 ? [0x00, 0x00, 0x20, 0xd4] : [0xcc]), // brk #0 / int3: never called
      });
      return { name: image.name(0), path: os.loadableImage(image.bytes) };
    };
    const accented = stubs("redefine_é_ß_test_");
    const long = stubs(`redefine_${"x".repeat(300)}_`);
    const short = stubs("rdf_");
    const found = (s: { name: string; path: string }) => os.symbolAddress(s.name, s.path);
    const accentedAt = found(accented);
    assert.ok(accentedAt > 0n, "found by its UTF-8 bytes");
    const longAt = found(long);
    assert.ok(longAt > 0n && longAt !== accentedAt);
    // Each after a longer one: its own bytes and terminator, nothing of the name before.
    assert.ok(found(short) > 0n);
    assert.ok(os.symbolAddress("getppid") > 0n);
    assertCode(() => os.symbolAddress(accented.name.replace("é", "e"), accented.path), "SYMBOL_NOT_FOUND");
    assertCode(() => os.symbolAddress(accented.name.replace("é", "\u00e9\u0301"), accented.path), "SYMBOL_NOT_FOUND");
    assert.equal(found(accented), accentedAt);
  });
}
