/**
 * `callers` on Windows x64, for real (run under Wine by `npm run test:windows`; registers nothing on
 * other systems): msvcrt's `time` reads the clock through its import address table slot for
 * kernel32's `GetSystemTimeAsFileTime`; redefined for msvcrt only, that slot (on a PAGE_READONLY
 * page) is rewritten with one store and comes back to its exact value and page protection, while
 * ucrtbase (which imports the same function) and the program's own call of kernel32 keep the real
 * clock. The same through a DLL written here (test/import_dll.ts), which imports from kernel32
 * by name on any Windows, loaded by the system's loader.
 */
import { assert, assertCode, test } from "./harness.ts";
import { imports, redefine, returns } from "../mod.ts";
import { importingDll } from "./import_dll.ts";
import { writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { platform } from "../platform/mod.ts";
import { onWindows, win32 } from "./windows_native.ts";

if (onWindows) {
  const { runtime, os } = platform();
  const msvcrt = runtime.open("msvcrt.dll", {
    time: { parameters: ["pointer"], result: "i64" },
    malloc: { parameters: ["usize"], result: "pointer" },
    free: { parameters: ["pointer"], result: "void" },
  });
  const ucrtbase = runtime.open("ucrtbase.dll", { _time64: { parameters: ["pointer"], result: "i64" } });
  const kernel32 = runtime.open("kernel32.dll", {
    GetSystemTimeAsFileTime: { parameters: ["buffer"], result: "void" },
    GetCurrentProcessId: { parameters: [], result: "u32" },
    VirtualQuery: { parameters: ["usize", "buffer", "usize"], result: "usize" },
    UnmapViewOfFile: { parameters: ["usize"], result: "i32" },
  });
  const { procAddress, onAnotherThread } = win32();

  /** FILETIME counts 100 ns from 1601; Unix seconds count from 1970. */
  const EPOCH_1601 = 116_444_736_000_000_000n;
  const fileTime = (unixSeconds: bigint) => unixSeconds * 10_000_000n + EPOCH_1601;
  const FAKE = 1_000_000_000n;
  const PAGE_READONLY = 0x02;
  const real = (t: bigint) => t > 1_700_000_000n;

  const TIME = { symbol: "GetSystemTimeAsFileTime", library: "kernel32.dll", parameters: ["pointer"], result: "void" } as const;
  const slot = () => {
    const found = imports("msvcrt.dll").filter((i) => i.name === TIME.symbol);
    assert.equal(found.length, 1, "msvcrt imports GetSystemTimeAsFileTime once");
    assert.equal(found[0].from?.toLowerCase(), "kernel32.dll");
    return found[0].slot;
  };
  const u64At = (address: bigint) => new DataView(runtime.view(address, 8).slice().buffer).getBigUint64(0, true);
  /** The page's PAGE_* protection, as VirtualQuery gives it (not only its PROT_* bits). */
  const pageProtection = (address: bigint) => {
    const mbi = new Uint8Array(48);
    assert.notEqual(kernel32.VirtualQuery(address, mbi, 48n), 0n);
    return new DataView(mbi.buffer).getUint32(36, true);
  };
  const kernel32Now = () => {
    const ft = new BigUint64Array(1);
    kernel32.GetSystemTimeAsFileTime(new Uint8Array(ft.buffer));
    return (ft[0] - EPOCH_1601) / 10_000_000n;
  };
  /** msvcrt's `time(NULL)` on a new thread (time_t fits the 32-bit exit code until 2106). */
  const timeOnAnotherThread = () => BigInt(onAnotherThread(procAddress("msvcrt.dll", "time")));

  /** Runs `body`; the slot's 8 bytes and its page's PAGE_* protection must come back exactly. */
  const slotComesBack = (at: bigint, body: () => void) => {
    const bytes = runtime.view(at, 8).slice();
    const protection = pageProtection(at);
    body();
    assert.deepEqual(runtime.view(at, 8).slice(), bytes, "the slot's exact value is back");
    assert.equal(pageProtection(at), protection, "the slot's page protection is back exactly");
    assert.ok(real(msvcrt.time(0n) as bigint), "msvcrt's clock is real again");
  };

  test("windows callers: msvcrt's IAT slot of GetSystemTimeAsFileTime is what GetProcAddress gives kernel32's", () => {
    assert.equal(u64At(slot()), procAddress("kernel32.dll", TIME.symbol));
    assert.equal(pageProtection(slot()), PAGE_READONLY, "the bound import address table is read-only");
    assert.ok(imports("ucrtbase.dll").some((i) => i.name === TIME.symbol), "ucrtbase imports it too");
    assert.ok(real(msvcrt.time(0n) as bigint));
  });

  test("windows callers: a JS replacement for msvcrt only; ucrtbase and the program's own call keep the real clock", () => {
    const at = slot();
    const held = u64At(at);
    slotComesBack(at, () => {
      const patch = redefine({ ...TIME, callers: "msvcrt.dll" }, (ft) => {
        runtime.view(ft, 8).set(new Uint8Array(BigUint64Array.of(fileTime(FAKE)).buffer));
      });
      try {
        assert.equal(patch.patchedAddress, at);
        assert.notEqual(u64At(at), held, "the slot is rewritten");
        assert.equal(pageProtection(at), PAGE_READONLY, "and its page read-only again while patched");
        assert.equal(msvcrt.time(0n), FAKE);
        assert.ok(real(ucrtbase._time64(0n) as bigint), "ucrtbase, importing the same function, is untouched");
        assert.ok(real(kernel32Now()), "the program's own call of kernel32 is untouched");
        const ft = msvcrt.malloc(8n) as bigint;
        try {
          patch.original(ft);
          assert.ok(real((u64At(ft) - EPOCH_1601) / 10_000_000n), "original calls what the slot held");
        } finally {
          msvcrt.free(ft);
        }
        assert.ok(real(timeOnAnotherThread()), "a call from another thread goes to the original");
      } finally {
        patch.restore();
      }
      assert.equal(patch.active, false);
    });
  });

  test("windows callers: a native replacement is the slot's new value itself, restored exactly", () => {
    const at = slot();
    const block = os.allocateCode(at, 2n ** 31n, 16)!;
    assert.ok(block, "a code block");
    try {
      const ft = new Uint8Array(BigUint64Array.of(fileTime(FAKE + 86_400n)).buffer);
      runtime.view(block.writable, 14).set([
        0x48, 0xb8, ...ft, // mov rax, imm64 (the fake FILETIME)
        0x48, 0x89, 0x01, //  mov [rcx], rax
        0xc3, //              ret
      ]);
      os.flushCode(block.address, 14);
      slotComesBack(at, () => {
        using patch = redefine({ ...TIME, callers: ["msvcrt.dll", "MSVCRT.DLL"] }, block.address);
        assert.equal(u64At(at), block.address, "the slot leads to the replacement, no stub in between");
        assert.equal(msvcrt.time(0n), FAKE + 86_400n);
        assert.equal(timeOnAnotherThread(), FAKE + 86_400n, "a native replacement serves every thread");
        assert.ok(real(ucrtbase._time64(0n) as bigint));
        assert.equal(patch.active, true);
      });
    } finally {
      kernel32.UnmapViewOfFile(block.writable);
      kernel32.UnmapViewOfFile(block.address);
    }
  });

  test("windows callers: stacks with an entry patch of the function the kernel32 thunk leads to, in either order", () => {
    const at = slot();
    const entry = os.symbolAddress(TIME.symbol, TIME.library);
    const entryBytes = runtime.view(entry, 16).slice();
    for (const entryFirst of [true, false]) {
      slotComesBack(at, () => {
        const make = () =>
          redefine(TIME, (ft) => {
            runtime.view(ft, 8).set(new Uint8Array(BigUint64Array.of(fileTime(FAKE)).buffer));
          });
        const whole = entryFirst ? make() : undefined;
        const scoped = redefine({ ...TIME, callers: "msvcrt.dll" }, (ft) => {
          scoped.original(ft);
          const view = new DataView(runtime.view(ft, 8).buffer, 0, 8);
          view.setBigUint64(0, view.getBigUint64(0, true) + 10n * 10_000_000n, true);
        });
        const wholeLater = whole ?? make();
        assert.equal(msvcrt.time(0n), FAKE + 10n, "msvcrt: its scoped replacement, then the entry patch");
        assert.equal(kernel32Now(), FAKE, "the program: the entry patch only");
        if (entryFirst) {
          scoped.restore();
          wholeLater.restore();
        } else {
          wholeLater.restore();
          assert.ok(real(msvcrt.time(0n) as bigint - 10n), "the scoped patch alone, its original the real clock");
          scoped.restore();
        }
      });
      assert.deepEqual(runtime.view(entry, 16).slice(), entryBytes, "the entry's bytes are back");
    }
  });

  test("windows callers: a DLL not loaded, one that does not import the symbol — typed errors, nothing written", () => {
    const at = slot();
    slotComesBack(at, () => {
      assertCode(() => redefine({ ...TIME, callers: "no_such_library.dll" }, () => {}), "LIBRARY_NOT_FOUND");
      assertCode(() => redefine({ ...TIME, callers: ["msvcrt.dll", "ntdll.dll"] }, () => {}), "NOT_IMPORTED", /ntdll\.dll/);
    });
  });

  test("windows callers: a DLL written here imports from kernel32 through its IAT; its slots redirected and restored exactly", () => {
    const name = `redefine-imports-${process.pid}-${Date.now().toString(36)}.dll`;
    const path = join(tmpdir(), name);
    writeFileSync(path, importingDll(name, [
      { library: "kernel32.dll", name: "GetCurrentProcessId" },
      { library: "kernel32.dll", name: TIME.symbol },
    ]));
    const dll = runtime.open(path, {
      call_GetCurrentProcessId: { parameters: [], result: "u32" },
      call_GetSystemTimeAsFileTime: { parameters: ["buffer"], result: "void" },
    });
    const slots = imports(name);
    assert.deepEqual(slots.map((i) => [i.name, i.from, i.kind]), [
      ["GetCurrentProcessId", "kernel32.dll", "iat"],
      [TIME.symbol, "kernel32.dll", "iat"],
    ]);
    for (const i of slots) assert.equal(i.target, procAddress("kernel32.dll", i.name), `the loader bound ${i.name}`);
    const pid = kernel32.GetCurrentProcessId() as number;
    assert.equal(dll.call_GetCurrentProcessId(), pid);
    const ft = new BigUint64Array(1);
    const viaDll = () => (dll.call_GetSystemTimeAsFileTime(new Uint8Array(ft.buffer)), (ft[0] - EPOCH_1601) / 10_000_000n);
    assert.ok(real(viaDll()));

    slotComesBack(slots[0].slot, () => {
      using patch = redefine(
        { symbol: "GetCurrentProcessId", library: "kernel32.dll", parameters: [], result: "u32", callers: name },
        returns(4242),
      );
      assert.equal(dll.call_GetCurrentProcessId(), 4242);
      assert.equal(kernel32.GetCurrentProcessId(), pid, "the program's own call is untouched");
      assert.equal(onAnotherThread(procAddress(name, "call_GetCurrentProcessId")), 4242, "a native replacement serves every thread");
      assert.equal(patch.calls, 2);
    });
    assert.equal(dll.call_GetCurrentProcessId(), pid);
    slotComesBack(slots[1].slot, () => {
      using _patch = redefine({ ...TIME, callers: path }, (p) => {
        runtime.view(p, 8).set(new Uint8Array(BigUint64Array.of(fileTime(FAKE)).buffer));
      });
      assert.equal(viaDll(), FAKE, "named by its path");
      assert.ok(real(msvcrt.time(0n) as bigint), "msvcrt, not named, keeps the real clock");
    });
    assert.ok(real(viaDll()));
  });
}
