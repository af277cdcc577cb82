/**
 * Windows x64 (run under Wine): what one 4-byte write into a read-only code page plus its undo
 * costs through `WriteProcessMemory(GetCurrentProcess(), ...)`, against the same two writes each
 * between a `VirtualProtect` pair (and `FlushInstructionCache`), and against `writeCode`, the path
 * redefine takes. A ratio in one run; prints one line and nothing else on other systems.
 */
import { platform } from "../platform/mod.ts";
import { writeCode } from "../src/code_memory.ts";

const onWindows = (globalThis as { Deno?: { build: { os: string } } }).Deno?.build.os === "windows" ||
  (globalThis as { process?: { platform: string } }).process?.platform === "win32";

/**
 * Microseconds per call of each body: rounds of `n` calls, the bodies taking turns within each
 * round so that drift hits all alike; the median round of each.
 */
function microseconds(bodies: (() => void)[], n: number, rounds = 15): number[] {
  const each: number[][] = bodies.map(() => []);
  for (let r = 0; r < rounds; r++) {
    bodies.forEach((body, b) => {
      const start = performance.now();
      for (let i = 0; i < n; i++) body();
      each[b].push(((performance.now() - start) * 1e3) / n);
    });
  }
  return each.map((xs) => xs.sort((a, b) => a - b)[Math.floor(rounds / 2)]);
}

if (!onWindows) {
  console.log("windows_write: Windows only (`npm run test:windows -- --bench` runs it under Wine)");
} else {
  const p = platform();
  const { runtime, os } = p;
  const k = runtime.open("kernel32.dll", {
    VirtualProtect: { parameters: ["usize", "usize", "u32", "buffer"], result: "i32" },
    VirtualQuery: { parameters: ["usize", "buffer", "usize"], result: "usize" },
    FlushInstructionCache: { parameters: ["i64", "usize", "usize"], result: "i32" },
    WriteProcessMemory: { parameters: ["i64", "usize", "buffer", "usize", "buffer"], result: "i32" },
    GetLastError: { parameters: [], result: "u32" },
  });
  const PAGE_EXECUTE_READWRITE = 0x40;
  const CURRENT_PROCESS = -1n;
  // msvcrt's labs: an image page, PAGE_EXECUTE_READ, that neither runtime calls.
  const target = os.symbolAddress("labs", "msvcrt.dll");
  const page = target - target % BigInt(os.pageSize);
  const original = runtime.view(target, 4).slice();
  const changed = Uint8Array.of(0xcc, 0xcc, 0xcc, 0xcc); // int3 ×4
  const protection = () => {
    const mbi = new Uint8Array(48);
    k.VirtualQuery(target, mbi, 48n);
    const v = new DataView(mbi.buffer);
    return `${v.getUint32(36, true).toString(16)} (region ${v.getBigUint64(24, true).toString(16)} bytes)`;
  };
  const before = protection();
  const old = new Uint8Array(4), written = new Uint8Array(8);

  const pairWrite = (bytes: Uint8Array) => {
    if (k.VirtualProtect(page, BigInt(os.pageSize), PAGE_EXECUTE_READWRITE, old) === 0) throw new Error("VirtualProtect");
    runtime.view(target, 4).set(bytes);
    k.VirtualProtect(page, BigInt(os.pageSize), new DataView(old.buffer).getUint32(0, true), old);
    k.FlushInstructionCache(CURRENT_PROCESS, target, 4n);
  };
  const wpmWrite = (bytes: Uint8Array) => {
    if (k.WriteProcessMemory(CURRENT_PROCESS, target, bytes, 4n, written) === 0) {
      throw new Error(`WriteProcessMemory failed: error ${k.GetLastError()}`);
    }
  };
  const check = (what: string) => {
    const now = runtime.view(target, 4).slice();
    if (now.some((b, i) => b !== original[i])) throw new Error(`${what} left the bytes changed`);
    if (protection() !== before) throw new Error(`${what} left the protection ${protection()}, was ${before}`);
  };

  wpmWrite(changed);
  const wpmLands = runtime.view(target, 4).every((b) => b === 0xcc);
  const during = protection();
  wpmWrite(original);
  check("WriteProcessMemory");
  console.log(`labs page: ${before}; after one WriteProcessMemory: ${during}; the bytes landed: ${wpmLands}`);
  // msvcrt's headers: a PAGE_READONLY image page. Its own bytes written back, so nothing changes.
  const headerBase = (() => {
    const mbi = new Uint8Array(48);
    k.VirtualQuery(target, mbi, 48n);
    return new DataView(mbi.buffer).getBigUint64(8, true); // AllocationBase: the image's base
  })();
  const same = runtime.view(headerBase + 0x40n, 4).slice();
  const readOnly = k.WriteProcessMemory(CURRENT_PROCESS, headerBase + 0x40n, same, 4n, written) !== 0;
  console.log(`a PAGE_READONLY page (msvcrt's headers): WriteProcessMemory ${readOnly ? "writes" : `refuses (error ${k.GetLastError()})`}`);

  const [pairs, wpm, ours] = microseconds([
    () => (pairWrite(changed), pairWrite(original)),
    () => (wpmWrite(changed), wpmWrite(original)),
    () => {
      writeCode(p, [{ address: target, bytes: changed }]);
      writeCode(p, [{ address: target, bytes: original }]);
    },
  ], 100);
  check("the measured writes");
  const row = (name: string, us: number) => console.log(`${name.padEnd(48)} ${us.toFixed(1).padStart(7)} µs  ${(us / pairs).toFixed(2)}×`);
  console.log(`${runtime.name} under Windows: a 4-byte write and its undo on a read-only code page`);
  row("VirtualProtect pair + store + flush, twice", pairs);
  row("WriteProcessMemory(GetCurrentProcess()), twice", wpm);
  row("writeCode (redefine's path), twice", ours);
}
