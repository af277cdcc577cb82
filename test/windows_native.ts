/**
 * What the Windows end-to-end tests share: whether they run on Windows at all, a symbol's address
 * as GetProcAddress gives it (no thunk followed), and a native function run on a new thread.
 * Opens kernel32 only when asked, so importing this anywhere else costs nothing.
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

/** The kernel32 helpers of the Windows tests; call it only on Windows. */
export function win32(): {
  procAddress(library: string, name: string): bigint;
  onAnotherThread(address: bigint): number;
} {
  const kernel32 = platform().runtime.open("kernel32.dll", {
    GetModuleHandleW: { parameters: ["buffer"], result: "usize" },
    GetProcAddress: { parameters: ["usize", "buffer"], result: "usize" },
    CreateThread: { parameters: ["usize", "usize", "usize", "usize", "u32", "buffer"], result: "usize" },
    WaitForSingleObject: { parameters: ["usize", "u32"], result: "u32" },
    GetExitCodeThread: { parameters: ["usize", "buffer"], result: "i32" },
    CloseHandle: { parameters: ["usize"], result: "i32" },
  });
  return {
    /** `name` in the loaded module `library`, as GetProcAddress gives it. */
    procAddress: (library, name) =>
      kernel32.GetProcAddress(kernel32.GetModuleHandleW(wide(library)), new TextEncoder().encode(name + "\0")) as bigint,
    /** Runs `address` (a function of at most one argument, given 0) on a new thread: the low 32 bits of its result. */
    onAnotherThread: (address) => {
      const thread = kernel32.CreateThread(0n, 0n, address, 0n, 0, new Uint8Array(4)) as bigint;
      assert.notEqual(thread, 0n, "CreateThread");
      try {
        assert.equal(kernel32.WaitForSingleObject(thread, 10_000), 0, "the thread ends");
        const code = new Uint32Array(1);
        assert.notEqual(kernel32.GetExitCodeThread(thread, new Uint8Array(code.buffer)), 0);
        return code[0];
      } finally {
        kernel32.CloseHandle(thread);
      }
    },
  };
}
