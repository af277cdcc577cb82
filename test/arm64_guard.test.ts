// The aarch64 guard stub's words, checked against aarch64-linux-gnu-objdump (pure: runs anywhere).
import { assert, assertCode, test } from "./harness.ts";
import { assertDisassembly, disassemble, h } from "./objdump_aarch64.ts";
import { GUARD_DATA_SIZE, GUARD_SIZE, guardStub, returnAddressReader, threadPointerReader } from "../src/arch/aarch64/guard.ts";
import { aarch64 } from "../src/arch/aarch64/mod.ts";
import { RedefineError } from "../src/errors.ts";
import type { Signature } from "../src/signature.ts";

const AT = 0x7f12_3456_0100n;
// A call pushes nothing on AArch64: one guard serves every signature, stack arguments included.
const signature = { parameters: ["i64"], result: "i64" } as const satisfies Signature;

const THREAD_POINTER: Record<string, string> = {
  linux: "mrs x16, tpidr_el0",
  windows: "mov x16, x18",
  darwin: "mrs x16, tpidrro_el0",
};

/** The runtime's code as the guards take it: its executable's text, and its FFI's part of that. */
const RUNTIME_CODE = { start: 0x5555_0000_0000n, end: 0x5555_0400_0000n, ffiStart: 0x5555_0123_0000n, ffiEnd: 0x5555_0123_2000n };

function listing(at: bigint, data: bigint, os = "linux"): (string | { quad: bigint })[] {
  const page = data - data % 4096n;
  const lo12 = data % 4096n;
  return [
    `ldr x16, ${h(at + 168n)}`,
    "sub x16, x30, x16",
    `tbnz x16, #63, ${h(at + 48n)}`,
    `ldr x16, ${h(at + 176n)}`,
    "sub x16, x30, x16",
    `tbz x16, #63, ${h(at + 48n)}`,
    `ldr x16, ${h(at + 184n)}`,
    "sub x16, x30, x16",
    `tbnz x16, #63, ${h(at + 136n)}`,
    `ldr x16, ${h(at + 192n)}`,
    "sub x16, x30, x16",
    `tbz x16, #63, ${h(at + 136n)}`,
    THREAD_POINTER[os],
    "and x16, x16, #0xfffffffffffffff8",
    `ldr x17, ${h(at + 144n)}`,
    "ldr x17, [x17]",
    "eor x16, x16, x17",
    `cbnz x16, ${h(at + 136n)}`,
    `adrp x17, ${h(page)}`,
    `add x17, x17, #${h(lo12)}`,
    "ldrb w16, [x17, #8]",
    `cbnz w16, ${h(at + 136n)}`,
    "mov w16, #0x1",
    "strb w16, [x17, #8]",
    "str x30, [x17]",
    `ldr x16, ${h(at + 152n)}`,
    "blr x16",
    `adrp x17, ${h(page)}`,
    `add x17, x17, #${h(lo12)}`,
    "ldrb w16, [x17, #8]",
    "and w16, w16, #0x2",
    "strb w16, [x17, #8]",
    "ldr x30, [x17]",
    "ret",
    `ldr x16, ${h(at + 160n)}`,
    "br x16",
    { quad: 0x7f00_dead_0000n },
    { quad: 0x7f00_cafe_1230n },
    { quad: 0x7f12_3456_0000n },
    { quad: RUNTIME_CODE.start },
    { quad: RUNTIME_CODE.end },
    { quad: RUNTIME_CODE.ffiStart },
    { quad: RUNTIME_CODE.ffiEnd },
  ];
}

test("arm64 guard: every word as objdump reads it, data after the code and far below it", () => {
  for (const data of [AT + 0x1000n + 0x230n, AT + 0x10_0000n + 0x8n, AT - 0x7000_0000n + 0xff0n]) {
    const options = {
      at: AT,
      data,
      identity: 0x7f00_dead_0000n,
      callback: 0x7f00_cafe_1230n,
      original: 0x7f12_3456_0000n,
      runtimeCode: RUNTIME_CODE,
      os: "linux",
      signature,
    };
    const bytes = guardStub(options);
    assert.equal(bytes.length, GUARD_SIZE);
    assertDisassembly(bytes, AT, listing(AT, data));
  }
  assert.equal(GUARD_DATA_SIZE, 16, "saved x30, then the busy byte");
});

test("arm64 guard: Windows keeps the thread's TEB in x18, macOS its TSD in tpidrro_el0; others are refused", () => {
  const options = {
    at: AT, data: AT + 0x2000n, identity: 0x7f00_dead_0000n, callback: 0x7f00_cafe_1230n, original: 0x7f12_3456_0000n,
    runtimeCode: RUNTIME_CODE, signature,
  };
  assertDisassembly(guardStub({ ...options, os: "windows" }), AT, listing(AT, AT + 0x2000n, "windows"));
  assertDisassembly(guardStub({ ...options, os: "darwin" }), AT, listing(AT, AT + 0x2000n, "darwin"));
  assertCode(() => guardStub({ ...options, os: "freebsd" }), "UNSUPPORTED_PLATFORM");
});

test("arm64 guard: writes only x16, x17 and x30, and leaves the flags alone", () => {
  const bytes = guardStub({ at: AT, data: AT + 0x2000n, identity: 1n, callback: 2n, original: 3n, runtimeCode: RUNTIME_CODE, os: "linux", signature });
  const code = disassemble(bytes.subarray(0, 144), AT);
  for (const line of code) {
    const [mnemonic, first] = line.split(/[ ,]+/);
    assert.ok(!/^(cmp|cmn|tst|subs|adds|ands|bics|ccmp)$/.test(mnemonic), `${line} sets the flags`);
    if (/^(str|strb|cbnz|tbz|tbnz|br|ret|nop)$/.test(mnemonic)) continue;
    if (mnemonic === "blr") continue; // x30, the return into the guard
    assert.ok(["x16", "w16", "x17", "w17", "x30"].includes(first), `${line} writes ${first}`);
  }
});

test("arm64 guard: the thread pointer reader and the wiring in the Arch", () => {
  const mask = "and x0, x0, #0xfffffffffffffff8";
  assertDisassembly(threadPointerReader("linux"), 0x1000n, ["mrs x0, tpidr_el0", mask, "ret"]);
  assertDisassembly(threadPointerReader("windows"), 0x1000n, ["mov x0, x18", mask, "ret"]);
  assertDisassembly(threadPointerReader("darwin"), 0x1000n, ["mrs x0, tpidrro_el0", mask, "ret"]);
  assert.deepEqual(aarch64.guard?.layout("linux", signature), {
    size: GUARD_SIZE,
    dataSize: GUARD_DATA_SIZE,
    busyOffset: 8, // after the saved x30
    shared: null,
  });
  const options = { at: AT, data: AT + 0x2000n, identity: 1n, callback: 2n, original: 3n, runtimeCode: RUNTIME_CODE, os: "linux", signature };
  assert.deepEqual(aarch64.guard?.encode(options), guardStub(options));
  const data = new Uint8Array(GUARD_DATA_SIZE).fill(0xa5);
  aarch64.guard?.data(options, data);
  assert.deepEqual(data, new Uint8Array(GUARD_DATA_SIZE));
  assert.equal(aarch64.guard?.threadPointerReader, threadPointerReader);
  assertDisassembly(returnAddressReader(), 0x1000n, ["mov x0, x30", "ret"]);
  assert.equal(aarch64.guard?.returnAddressReader, returnAddressReader);
});

test("arm64 guard: misaligned data or code is refused, not encoded wrong", () => {
  const options = { at: AT, data: AT + 0x2000n, identity: 1n, callback: 2n, original: 3n, runtimeCode: RUNTIME_CODE, os: "linux", signature };
  assert.throws(() => guardStub({ ...options, data: AT + 0x2004n }), RangeError);
  assert.throws(() => guardStub({ ...options, at: AT + 2n }), (e) => e instanceof RedefineError);
});
