/**
 * Live patching on Windows x64, for real (run under Wine by `npm run test:windows`; registers
 * nothing on other systems): two native threads call a function in a loop while the JS thread
 * redefines it to a native replacement and restores it, over and over, through VirtualProtect
 * pairs. Every call must see the original's result or the replacement's: the entry is one aligned
 * 8-byte store, or, across two words, a jump to itself first, then the tail, then the head.
 */
import { assert, test } from "./harness.ts";
import { redefine } from "../mod.ts";
import { platform } from "../platform/mod.ts";
import { log } from "node:console";
import { onWindows, wide } from "./windows_native.ts";

// thread_loop(record), Windows x64: until record.stop, call record.fn and count what it returned:
// 1 → record.ones, 2 → record.twos, anything else → record.others. Every 1024 calls it calls
// record.yield (SwitchToThread), so that on a 2-core machine the patching JS thread gets to run.
// record: fn +0, ones +8, twos +16, others +24, stop +32, calls +40, yield +48.
const THREAD_LOOP = [
  0x53, //                                 push rbx
  0x48, 0x83, 0xec, 0x20, //               sub rsp, 32 (shadow space; rsp stays 16-aligned)
  0x48, 0x89, 0xcb, //                     mov rbx, rcx
  0xff, 0x13, //                           loop: call [rbx]
  0x48, 0x83, 0xf8, 0x01, //               cmp rax, 1
  0x75, 0x06, //                           jne not_one
  0x48, 0xff, 0x43, 0x08, //               inc qword [rbx+8]
  0xeb, 0x10, //                           jmp next
  0x48, 0x83, 0xf8, 0x02, //               not_one: cmp rax, 2
  0x75, 0x06, //                           jne other
  0x48, 0xff, 0x43, 0x10, //               inc qword [rbx+16]
  0xeb, 0x04, //                           jmp next
  0x48, 0xff, 0x43, 0x18, //               other: inc qword [rbx+24]
  0xff, 0x43, 0x28, //                     next: inc dword [rbx+40]
  0xf7, 0x43, 0x28, 0xff, 0x03, 0, 0, //   test dword [rbx+40], 0x3ff
  0x75, 0x03, //                           jnz check
  0xff, 0x53, 0x30, //                     call [rbx+48] (SwitchToThread)
  0x80, 0x7b, 0x20, 0x00, //               check: cmp byte [rbx+32], 0
  0x74, 0xcd, //                           je loop
  0x48, 0x83, 0xc4, 0x20, //               add rsp, 32
  0x5b, //                                 pop rbx
  0x31, 0xc0, //                           xor eax, eax
  0xc3, //                                 ret
];
const RETURN_1 = [0xb8, 0x01, 0, 0, 0, 0xc3]; // mov eax, 1; ret
const RETURN_2 = [0xb8, 0x02, 0, 0, 0, 0xc3]; // mov eax, 2; ret
const INT3 = 0xcc, NOP = 0x90;
// As many as the Linux stress test: each toggle (two VirtualProtect pairs) takes ~0.1 ms under Wine.
const TOGGLES = 100_000;

if (onWindows) {
  const { runtime } = platform();
  const kernel32 = runtime.open("kernel32.dll", {
    VirtualAlloc: { parameters: ["usize", "usize", "u32", "u32"], result: "usize" },
    VirtualProtect: { parameters: ["usize", "usize", "u32", "buffer"], result: "i32" },
    VirtualFree: { parameters: ["usize", "usize", "u32"], result: "i32" },
    FlushInstructionCache: { parameters: ["i64", "usize", "usize"], result: "i32" },
    CreateThread: { parameters: ["usize", "usize", "usize", "buffer", "u32", "buffer"], result: "usize" },
    WaitForSingleObject: { parameters: ["usize", "u32"], result: "u32" },
    CloseHandle: { parameters: ["usize"], result: "i32" },
    GetModuleHandleW: { parameters: ["buffer"], result: "usize" },
    GetProcAddress: { parameters: ["usize", "buffer"], result: "usize" },
  });
  const MEM_COMMIT_RESERVE = 0x3000, MEM_RELEASE = 0x8000;
  const PAGE_READWRITE = 0x04, PAGE_EXECUTE_READ = 0x20;
  const switchToThread = kernel32.GetProcAddress(
    kernel32.GetModuleHandleW(wide("kernel32.dll")),
    new TextEncoder().encode("SwitchToThread\0"),
  ) as bigint;

  /** `code` at `offset` into a fresh page of its own, then made read+execute. */
  const assemble = (code: readonly number[], offset = 0): { address: bigint; base: bigint } => {
    const base = kernel32.VirtualAlloc(0n, 4096n, MEM_COMMIT_RESERVE, PAGE_READWRITE) as bigint;
    assert.notEqual(base, 0n, "VirtualAlloc");
    const page = runtime.view(base, 4096);
    page.fill(INT3);
    page.set(code, offset);
    assert.notEqual(kernel32.VirtualProtect(base, 4096n, PAGE_EXECUTE_READ, new Uint8Array(4)), 0, "VirtualProtect");
    kernel32.FlushInstructionCache(-1n, base, 4096n);
    return { address: base + BigInt(offset), base };
  };
  const unassemble = (base: bigint) => kernel32.VirtualFree(base, 0n, MEM_RELEASE);

  /**
   * Two native threads call `targets[0]` and `targets[1]` in a loop while the JS thread runs
   * `toggle` TOGGLES times; returns what the threads saw.
   */
  const hammer = (targets: bigint[], toggle: (i: number) => void) => {
    const loop = assemble(THREAD_LOOP);
    const records = targets.map((target) => new BigUint64Array([target, 0n, 0n, 0n, 0n, 0n, switchToThread]));
    const threads = records.map((record) => {
      const thread = kernel32.CreateThread(0n, 0n, loop.address, new Uint8Array(record.buffer), 0, new Uint8Array(4)) as bigint;
      assert.notEqual(thread, 0n, "CreateThread");
      return thread;
    });
    try {
      for (let i = 0; i < TOGGLES; i++) toggle(i);
    } finally {
      for (const record of records) Atomics.store(record, 4, 1n);
      for (const thread of threads) {
        kernel32.WaitForSingleObject(thread, 0xffffffff);
        kernel32.CloseHandle(thread);
      }
      unassemble(loop.base);
    }
    const sum = (k: number) => records.reduce((n, r) => n + r[k], 0n);
    return { ones: sum(1), twos: sum(2), others: sum(3) };
  };

  test(`windows stress: ${TOGGLES} native redirects on and off under two calling threads`, () => {
    // One entry inside an aligned 8-byte word (one atomic store), one across two (spin, tail, head).
    const offsets = [0, 5];
    const targets = offsets.map((offset) => assemble([...Array(offset).fill(NOP), ...RETURN_1], 0x100));
    const addresses = targets.map((t, i) => t.address + BigInt(offsets[i]));
    const replacement = assemble(RETURN_2);
    try {
      const seen = hammer(addresses, (i) => {
        const address = addresses[i % 2];
        redefine({ address, size: 16, parameters: [], result: "i32" }, replacement.address).restore();
      });
      log(`windows stress: ${seen.ones} calls saw the original, ${seen.twos} the replacement, ${seen.others} anything else`);
      assert.equal(seen.others, 0n, "every result is the original's or the replacement's");
      assert.ok(seen.ones > 0n && seen.twos > 0n, "both were seen");
    } finally {
      for (const t of [...targets, replacement]) unassemble(t.base);
    }
  });
}
