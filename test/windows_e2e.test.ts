/**
 * End to end on Windows x64, for real (run under Wine by `npm run test:windows`; registers nothing
 * on other systems). The Windows counterparts of the Linux suite's libc subjects: msvcrt's `labs`
 * and `strtol`, kernel32's `GetCurrentProcessId` (an import thunk into kernelbase).
 */
import { assert, assertCode, test } from "./harness.ts";
import { redefine } from "../mod.ts";
import { platform } from "../platform/mod.ts";
import { PROT_EXEC, PROT_WRITE } from "../platform/mod.ts";
import type { NativeCall } from "../platform/mod.ts";
import { onWindows, wide } from "./windows_native.ts";

if (onWindows) {
  const { runtime, os } = platform();
  const msvcrt = runtime.open("msvcrt.dll", {
    labs: { parameters: ["i32"], result: "i32" },
    strtol: { parameters: ["buffer", "pointer", "i32"], result: "i32" },
  });
  const kernel32 = runtime.open("kernel32.dll", {
    GetCurrentProcessId: { parameters: [], result: "u32" },
    GetCurrentThreadId: { parameters: [], result: "u32" },
    GetComputerNameExA: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
    GetModuleHandleW: { parameters: ["buffer"], result: "usize" },
    GetProcAddress: { parameters: ["usize", "buffer"], result: "usize" },
    UnmapViewOfFile: { parameters: ["usize"], result: "i32" },
  });
  /** kernel32's own export, as GetProcAddress gives it (no thunk followed). */
  const rawExport = (name: string) =>
    kernel32.GetProcAddress(kernel32.GetModuleHandleW(wide("kernel32.dll")), new TextEncoder().encode(name + "\0")) as bigint;
  const realPid = kernel32.GetCurrentProcessId() as number;

  // The runtimes' own code memory on Windows is partly writable+executable (Deno's callbacks come
  // from libffi's W+X closures; V8's code space grows): only images (ours included: the stub DLL)
  // and the patched page are checked.
  const writableExecutableImages = () =>
    os.mappings().filter((m) => (m.protection & (PROT_WRITE | PROT_EXEC)) === (PROT_WRITE | PROT_EXEC) && m.path !== "")
      .map((m) => `${m.start.toString(16)}-${m.end.toString(16)} ${m.path}`);

  /** Runs `body`; the bytes and the protection at `address` must come back exactly. */
  const leavesNoTrace = (address: bigint, body: () => void): void => {
    const bytes = runtime.view(address, 32).slice();
    const protection = os.mappingAt(address)!.protection;
    const wx = writableExecutableImages();
    body();
    assert.deepEqual(runtime.view(address, 32).slice(), bytes, "code bytes restored exactly");
    assert.equal(os.mappingAt(address)!.protection, protection, "page protection restored exactly");
    assert.deepEqual(writableExecutableImages(), wx, "no image left writable+executable");
  };

  const cstr = (text: string) => new TextEncoder().encode(text + "\0");

  test("windows: page size, symbols by module and across loaded modules, typed errors", () => {
    assert.equal(os.pageSize, 4096);
    const labs = os.symbolAddress("labs", "msvcrt.dll");
    // ntdll, loaded before msvcrt, exports a labs of its own: the first module in load order wins.
    assert.equal(os.symbolAddress("labs"), os.symbolAddress("labs", "ntdll.dll"), "found by walking the loaded modules");
    assert.ok(os.mappingAt(labs)!.protection & PROT_EXEC);
    assertCode(() => os.symbolAddress("no_such_function", "msvcrt.dll"), "SYMBOL_NOT_FOUND");
    assertCode(() => os.symbolAddress("x", "no_such_library.dll"), "LIBRARY_NOT_FOUND");
  });

  test("windows: kernel32's import thunks are followed to the function they jump to", () => {
    const address = os.symbolAddress("GetCurrentProcessId", "kernel32.dll");
    const code = runtime.view(address, 2);
    assert.ok(!(code[0] === 0xff && code[1] === 0x25), "not a jmp [rip+x] thunk");
    const where = os.symbolAt(address);
    console.log(`GetCurrentProcessId: ${address.toString(16)} in ${where?.library} (${where?.name}, ${where?.size} bytes)`);
  });

  test("windows: a real kernel32 import thunk (GetComputerNameExA under Wine) is redefined where it leads", () => {
    const raw = rawExport("GetComputerNameExA");
    const address = os.symbolAddress("GetComputerNameExA", "kernel32.dll");
    const code = runtime.view(raw, 2);
    if (code[0] === 0xff && code[1] === 0x25) {
      assert.notEqual(address, raw, "the thunk is followed");
      assert.notEqual(os.symbolAt(address)?.library ?? "", os.symbolAt(raw)?.library ?? "", "into another module");
    }
    const before = runtime.view(raw, 16).slice();
    leavesNoTrace(address, () => {
      using patch = redefine(
        { symbol: "GetComputerNameExA", library: "kernel32.dll", parameters: ["i32", "buffer", "buffer"], result: "i32" },
        () => 7,
      );
      assert.equal(patch.address, address);
      assert.deepEqual(runtime.view(raw, 16).slice(), before, "the thunk itself is left alone");
      // The caller goes through kernel32's thunk and lands in the redefined function.
      assert.equal(kernel32.GetComputerNameExA(0, new Uint8Array(256), new Uint8Array(4)), 7);
    });
    const size = new Uint32Array([256]);
    assert.equal(kernel32.GetComputerNameExA(0, new Uint8Array(256), new Uint8Array(size.buffer)), 1);
  });

  test("windows: a JS replacement of msvcrt labs, then restored exactly", () => {
    const address = os.symbolAddress("labs", "msvcrt.dll");
    leavesNoTrace(address, () => {
      const seen: number[] = [];
      const patch = redefine({ symbol: "labs", library: "msvcrt.dll", parameters: ["i32"], result: "i32" }, (x) => {
        seen.push(x);
        return x * 10;
      });
      try {
        assert.equal(patch.address, address);
        assert.equal(os.mappingAt(address)!.protection & PROT_WRITE, 0, "the text page is not writable while patched");
        assert.equal(msvcrt.labs(-7), -70);
        assert.equal(patch.original(-7), 7, "the original, through the trampoline and the PE stub library");
      } finally {
        patch.restore();
      }
      assert.deepEqual(seen, [-7]);
      assert.equal(msvcrt.labs(-7), 7);
    });
  });

  test("windows: pointers reach a replacement as bigint addresses: msvcrt strtol", () => {
    const address = os.symbolAddress("strtol", "msvcrt.dll");
    leavesNoTrace(address, () => {
      const patch = redefine(
        { symbol: "strtol", library: "msvcrt.dll", parameters: ["buffer", "pointer", "i32"], result: "i32" },
        (text, _end, base) => runtime.cString(text).length * 100 + base,
      );
      try {
        assert.equal(msvcrt.strtol(cstr("12345"), 0n, 10), 510);
      } finally {
        patch.restore();
      }
      assert.equal(msvcrt.strtol(cstr("12345"), 0n, 10), 12345);
    });
  });

  test("windows: native to native, kernel32 GetCurrentProcessId runs GetCurrentThreadId", () => {
    const address = os.symbolAddress("GetCurrentProcessId", "kernel32.dll");
    leavesNoTrace(address, () => {
      using _patch = redefine(
        { symbol: "GetCurrentProcessId", library: "kernel32.dll", parameters: [], result: "u32" },
        { symbol: "GetCurrentThreadId", library: "kernel32.dll" },
      );
      assert.equal(kernel32.GetCurrentProcessId(), kernel32.GetCurrentThreadId());
    });
    assert.equal(kernel32.GetCurrentProcessId(), realPid);
  });

  test("windows: a JS replacement of GetCurrentProcessId behind the guard (gs:[0x30] thread check)", () => {
    const patch = redefine({ symbol: "GetCurrentProcessId", library: "kernel32.dll", parameters: [], result: "u32" }, () => 4242);
    try {
      assert.equal(kernel32.GetCurrentProcessId(), 4242);
      assert.equal(patch.original(), realPid);
    } finally {
      patch.restore();
    }
    assert.equal(kernel32.GetCurrentProcessId(), realPid);
  });

  // Memory freed and allocated again at the same base, smaller, with code jumping into an entry
  // where the freed memory had none: what was learnt there (no jump into it) is forgotten.
  test("windows: UNRELOCATABLE for new code jumping into an entry, allocated where patched code was freed", () => {
    const memory = runtime.open("kernel32.dll", {
      VirtualAlloc: { parameters: ["usize", "usize", "u32", "u32"], result: "usize" },
      VirtualProtect: { parameters: ["usize", "usize", "u32", "buffer"], result: "i32" },
      VirtualFree: { parameters: ["usize", "usize", "u32"], result: "i32" },
    });
    const MEM_COMMIT_RESERVE = 0x3000, MEM_RELEASE = 0x8000, PAGE_READWRITE = 0x04, PAGE_EXECUTE_READ = 0x20;
    const code = (bytes: readonly number[], at: bigint, size: number): bigint => {
      const address = memory.VirtualAlloc(at, BigInt(size), MEM_COMMIT_RESERVE, PAGE_READWRITE) as bigint;
      assert.ok(address !== 0n && (at === 0n || address === at), "VirtualAlloc");
      runtime.view(address, bytes.length).set(bytes);
      assert.notEqual(memory.VirtualProtect(address, BigInt(size), PAGE_EXECUTE_READ, new Uint8Array(4)), 0);
      return address;
    };
    const free = (address: bigint) => assert.notEqual(memory.VirtualFree(address, 0n, MEM_RELEASE), 0, "VirtualFree");
    const labs = os.symbolAddress("labs", "msvcrt.dll");
    const entry = (base: bigint) => ({ address: base + 64n, size: 8, parameters: ["i64"], result: "i64" }) as const;
    const first = code([...Array(72).fill(0x90), 0xc3], 0n, 0x20000);
    redefine(entry(first), labs).restore();
    free(first);
    // Smaller: the pool may have taken the free space beside it since. A jmp rel8 at offset 0 to
    // offset 66, the entry's third byte.
    const again = code([0xeb, 0x40, ...Array(70).fill(0x90), 0xc3], first, 0x10000);
    try {
      assertCode(() => redefine(entry(again), labs), "UNRELOCATABLE", /jumps into the first/);
    } finally {
      free(again);
    }
  });

  test("windows: a stub block near the target is read+execute, its alias read+write, its data read+write", () => {
    const near = os.symbolAddress("labs", "msvcrt.dll");
    const block = os.allocateCode(near, 2n ** 31n - 2n ** 20n, os.pageSize)!;
    try {
      assert.ok(block, "near memory found");
      const distance = block.address > near ? block.address - near : near - block.address;
      assert.ok(distance < 2n ** 31n);
      assert.equal(os.mappingAt(block.address)!.protection & (PROT_WRITE | PROT_EXEC), PROT_EXEC);
      assert.equal(os.mappingAt(block.writable)!.protection & (PROT_WRITE | PROT_EXEC), PROT_WRITE);
      assert.equal(os.mappingAt(block.data)!.protection & (PROT_WRITE | PROT_EXEC), PROT_WRITE);
      runtime.view(block.writable, 3).set([0x8d, 0x41, 0x01]); // lea eax, [rcx+1]
      runtime.view(block.writable + 3n, 1).set([0xc3]); //        ret
      os.flushCode(block.address, 4);
      const inc: NativeCall = runtime.fnPointer(block.address, { parameters: ["i32"], result: "i32" });
      assert.equal(inc(41), 42, "code written through the alias runs where it is executable");
    } finally {
      // The pool never gives a block back; this one is the test's own.
      kernel32.UnmapViewOfFile(block.writable);
      kernel32.UnmapViewOfFile(block.address);
    }
  });
}
