import { assert, assertCode, runtimeName, runtimePath, test } from "./harness.ts";
import { archFor } from "../src/arch/mod.ts";
import { osFor } from "../platform/mod.ts";
import { parseMaps } from "../platform/linux.ts";
import { nearCandidates } from "../platform/address_space.ts";
import { writeCode } from "../src/code_memory.ts";
import { platform } from "../platform/mod.ts";
import { bytesAt, libc, os, protectionAt, runtime, unwritableCode } from "./native.ts";
import { execFileSync } from "node:child_process";

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
  assert.deepEqual(maps[0], { start: 0x55d0a000n, end: 0x55d0b000n, protection: 5, path: "/usr/bin/x" });
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

test("a write that fails half-way rolls back every page and byte", () => {
  const p = platform();
  const labs = os.symbolAddress("labs");
  const unwritable = unwritableCode(); // mprotect refuses to make it writable
  const before = bytesAt(labs, 8);
  const protection = protectionAt(labs);
  try {
    assertCode(
      () => writeCode(p, [{ address: labs, bytes: new Uint8Array(8).fill(0xcc) }, { address: unwritable, bytes: Uint8Array.of(0xcc) }]),
      "PROTECT_FAILED",
    );
  } finally {
    libc.munmap(unwritable, BigInt(os.pageSize));
  }
  assert.deepEqual(bytesAt(labs, 8), before);
  assert.equal(protectionAt(labs), protection);
});
