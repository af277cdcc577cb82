/**
 * What the Windows end-to-end tests share: whether they run on Windows at all, a symbol's address
 * as GetProcAddress gives it (no thunk followed), native functions run on new threads, and memory
 * of their own for code and data (VirtualAlloc). Opens kernel32 only when asked, so importing this
 * anywhere else costs nothing.
 */
import { assert } from "./harness.ts";
import { platform } from "../platform/mod.ts";

/** True under Windows (here: Wine), for either runtime. */
export const onWindows: boolean = (globalThis as { Deno?: { build: { os: string } } }).Deno?.build.os === "windows" ||
  (globalThis as { process?: { platform: string } }).process?.platform === "win32";

/** A NUL-terminated UTF-16 string, as the `W` functions take it. */
export function wide(text: string): Uint8Array {
  return new Uint8Array(Uint16Array.from([...text, "\0"].map((c) => c.charCodeAt(0))).buffer);
}

/** Memory of a test's own from VirtualAlloc: its address, and giving it back. */
export interface Allocation {
  readonly address: bigint;
  release(): void;
}

/** The kernel32 helpers of the Windows tests; call it only on Windows. */
export function win32(): {
  procAddress(library: string, name: string): bigint;
  onAnotherThread(address: bigint): number;
  onThreads(address: bigint, parameters: readonly bigint[], meanwhile?: () => void): number[];
  assemble(code: readonly number[]): Allocation;
  allocate(size: number): Allocation;
} {
  const { runtime } = platform();
  const kernel32 = runtime.open("kernel32.dll", {
    GetModuleHandleW: { parameters: ["buffer"], result: "usize" },
    GetProcAddress: { parameters: ["usize", "buffer"], result: "usize" },
    CreateThread: { parameters: ["usize", "usize", "usize", "usize", "u32", "buffer"], result: "usize" },
    WaitForSingleObject: { parameters: ["usize", "u32"], result: "u32" },
    GetExitCodeThread: { parameters: ["usize", "buffer"], result: "i32" },
    CloseHandle: { parameters: ["usize"], result: "i32" },
    VirtualAlloc: { parameters: ["usize", "usize", "u32", "u32"], result: "usize" },
    VirtualProtect: { parameters: ["usize", "usize", "u32", "buffer"], result: "i32" },
    VirtualFree: { parameters: ["usize", "usize", "u32"], result: "i32" },
    FlushInstructionCache: { parameters: ["i64", "usize", "usize"], result: "i32" },
  });
  const MEM_COMMIT_RESERVE = 0x3000, MEM_RELEASE = 0x8000, PAGE_READWRITE = 0x04, PAGE_EXECUTE_READ = 0x20;
  const allocate = (size: number): Allocation => {
    const address = kernel32.VirtualAlloc(0n, BigInt(size), MEM_COMMIT_RESERVE, PAGE_READWRITE) as bigint;
    assert.notEqual(address, 0n, "VirtualAlloc");
    return { address, release: () => assert.notEqual(kernel32.VirtualFree(address, 0n, MEM_RELEASE), 0, "VirtualFree") };
  };
  /**
   * Starts `address` on one new thread per parameter, all at once, runs `meanwhile` on this
   * thread while they run, and waits for them all.
   */
  const onThreads = (address: bigint, parameters: readonly bigint[], meanwhile = () => {}): number[] => {
    const threads = parameters.map((parameter) => {
      const thread = kernel32.CreateThread(0n, 0n, address, parameter, 0, new Uint8Array(4)) as bigint;
      assert.notEqual(thread, 0n, "CreateThread");
      return thread;
    });
    try {
      meanwhile();
      return threads.map((thread) => {
        assert.equal(kernel32.WaitForSingleObject(thread, 60_000), 0, "the thread ends");
        const code = new Uint32Array(1);
        assert.notEqual(kernel32.GetExitCodeThread(thread, new Uint8Array(code.buffer)), 0);
        return code[0];
      });
    } finally {
      for (const thread of threads) kernel32.CloseHandle(thread);
    }
  };
  return {
    /** `name` in the loaded module `library`, as GetProcAddress gives it. */
    procAddress: (library, name) =>
      kernel32.GetProcAddress(kernel32.GetModuleHandleW(wide(library)), new TextEncoder().encode(name + "\0")) as bigint,
    /** Runs `address` (a function of at most one argument, given 0) on a new thread: the low 32 bits of its result. */
    onAnotherThread: (address) => onThreads(address, [0n])[0],
    /** Runs `address` with each parameter on a thread of its own, at once: the low 32 bits of each result. */
    onThreads,
    /** `code` at the start of a page of its own, then made read+execute. */
    assemble: (code) => {
      const page = allocate(4096);
      runtime.view(page.address, code.length).set(code);
      assert.notEqual(kernel32.VirtualProtect(page.address, 4096n, PAGE_EXECUTE_READ, new Uint8Array(4)), 0, "VirtualProtect");
      kernel32.FlushInstructionCache(-1n, page.address, 4096n);
      return page;
    },
    /** `size` bytes of zeroed read+write memory. */
    allocate,
  };
}
