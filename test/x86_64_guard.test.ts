/**
 * The x86-64 guard stubs and the registry lock, read back with iced-x86: every instruction and
 * every target.
 */
import { assert, test } from "./harness.ts";
import { Decoder, DecoderOptions, FastFormatter } from "iced-x86";
import { guardData, guardLayout, guardStub, returnAddressReader, threadPointerReader } from "../src/arch/x86_64/guard.ts";
import { registryLock } from "../src/arch/x86_64/registry_lock.ts";
import { x86_64 } from "../src/arch/x86_64/mod.ts";
import type { NativeType } from "../src/signature.ts";

const AT = 0x7f00_0000_1000n;
const DATA = AT + 0x1000n;

function disassemble(code: Uint8Array, address: bigint, count: number): string[] {
  const decoder = new Decoder(64, code, DecoderOptions.None);
  decoder.ip = address;
  const formatter = new FastFormatter();
  const lines: string[] = [];
  while (lines.length < count) lines.push(formatter.format(decoder.decode()));
  decoder.free();
  formatter.free();
  return lines;
}

const SHARED = AT + 0x800n;
/** The runtime's code as the guards take it: its executable's text, and its FFI's part of that. */
const RUNTIME_CODE = { start: 0x5555_0000_0000n, end: 0x5555_0400_0000n, ffiStart: 0x5555_0123_0000n, ffiEnd: 0x5555_0123_2000n };

function guard(os: string, parameters: NativeType[]) {
  const signature = { parameters, result: "i64" as const };
  const layout = guardLayout(os, signature);
  const options = {
    at: AT, data: DATA, identity: 0x1111n, callback: 0x2222n, original: 0x3333n, runtimeCode: RUNTIME_CODE, os, signature,
    shared: layout.shared ? SHARED : undefined,
  };
  const code = guardStub(options);
  // Written over what a reused slot's data held before.
  const data = new Uint8Array(layout.dataSize).fill(0xa5);
  guardData(options, data);
  return { layout, code, data };
}

test("calling guard (nothing on the stack): a 12-byte thunk per patch, its record, one shared body", () => {
  const { layout, code, data } = guard("linux", ["i64", "pointer", "i32", "f64"]);
  assert.equal(layout.size, 12);
  assert.equal(code.length, 12);
  assert.deepEqual(disassemble(code, AT, 2), ["lea r11,[7F0000002000h]", "jmp 7F0000001800h"]);
  const record = new DataView(data.buffer);
  assert.deepEqual([0, 8, 16].map((o) => record.getBigUint64(o, true)), [0x1111n, 0x2222n, 0x3333n]);
  assert.deepEqual([32, 40, 48, 56].map((o) => record.getBigUint64(o, true)), Object.values(RUNTIME_CODE));
  assert.equal(data[layout.busyOffset], 0, "not busy");
  assert.deepEqual(disassemble(layout.shared!, SHARED, 32), [
    "push r11",
    "mov r11,[r11+20h]",
    "cmp [rsp+8h],r11",
    "mov r11,[rsp]",
    "jb 7F000000184Eh",
    "mov r11,[r11+28h]",
    "cmp [rsp+8h],r11",
    "mov r11,[rsp]",
    "jae 7F000000184Eh",
    "mov r11,[r11+30h]",
    "cmp [rsp+8h],r11",
    "mov r11,[rsp]",
    "jb 7F0000001884h",
    "mov r11,[r11+38h]",
    "cmp [rsp+8h],r11",
    "mov r11,[rsp]",
    "jae 7F0000001884h",
    "mov r11,[r11]", // the identity word's address, from the record
    "mov r11,[r11]", // the JS thread, 0 once the isolate ended
    "cmp r11,fs:[10h]",
    "pop r11",
    "jne 7F0000001886h",
    "cmp byte ptr [r11+18h],0h",
    "jne 7F0000001886h",
    "mov byte ptr [r11+18h],1h",
    "push r11",
    "call qword ptr [r11+8h]",
    "pop r11",
    "and byte ptr [r11+18h],0FEh", // clears the running bit, keeps the retired one
    "ret",
    "pop r11",
    "jmp qword ptr [r11+10h]",
  ]);
  assert.equal(layout.shared!.length, 0x8a, "to_original (the last instruction) at +0x86");
});

test("swapping guard (stack arguments, 7 integers): keeps the return address aside instead of calling", () => {
  const { layout, code } = guard("linux", ["i64", "i64", "i64", "i64", "i64", "i64", "i64"]);
  assert.equal(layout.shared, null);
  const lines = disassemble(code, AT, 24);
  assert.deepEqual(lines.slice(0, 9), [
    "mov r11,[rsp]",
    "cmp r11,[7F00000010B0h]",
    "jb 7F0000001038h",
    "cmp r11,[7F00000010B8h]",
    "jae 7F0000001038h",
    "cmp r11,[7F00000010C0h]",
    "jb 7F000000108Eh",
    "cmp r11,[7F00000010C8h]",
    "jae 7F000000108Eh",
  ]);
  assert.deepEqual(lines.slice(9, 16), [
    "mov r11,[7F0000001098h]", // the identity word's address
    "mov r11,[r11]",
    "cmp r11,fs:[10h]",
    "jne 7F000000108Eh",
    "cmp byte ptr [7F0000002008h],0h",
    "jne 7F000000108Eh",
    "mov byte ptr [7F0000002008h],1h",
  ]);
  assert.deepEqual(lines.slice(16), [
    "mov r11,[rsp]",
    "mov [7F0000002000h],r11",
    "lea r11,[7F0000001081h]",
    "mov [rsp],r11",
    "jmp qword ptr [7F00000010A0h]",
    "and byte ptr [7F0000002008h],0FEh",
    "jmp qword ptr [7F0000002000h]",
    "jmp qword ptr [7F00000010A8h]",
  ]);
  const literals = new DataView(code.buffer, code.byteOffset + 0x98);
  assert.deepEqual([0, 8, 16, 24, 32, 40, 48].map((o) => literals.getBigUint64(o, true)), [
    0x1111n, 0x2222n, 0x3333n, ...Object.values(RUNTIME_CODE),
  ]);
  assert.equal(code.length, 0xd0, "the literals end the guard");
});

test("guard on Windows: the TEB's self pointer, and 32 bytes of shadow space below 5 arguments", () => {
  const { layout } = guard("windows", ["i64", "i64", "i64", "i64"]);
  const shared = disassemble(layout.shared!, SHARED, 30);
  assert.equal(shared[19], "cmp r11,gs:[30h]");
  assert.deepEqual(shared.slice(25, 28), ["push r11", "sub rsp,20h", "call qword ptr [r11+8h]"]);
  assert.equal(guard("windows", ["i64", "i64", "i64", "i64", "i64"]).layout.shared, null, "a fifth argument goes on the stack");
});

test("the thread pointer reader reads what the guard compares", () => {
  assert.deepEqual(disassemble(threadPointerReader("linux"), 0n, 2), ["mov rax,fs:[10h]", "ret"]);
  assert.deepEqual(disassemble(threadPointerReader("windows"), 0n, 2), ["mov rax,gs:[30h]", "ret"]);
});

test("the return address reader reads what the guard compares: [rsp] at entry", () => {
  assert.deepEqual(disassemble(returnAddressReader(), 0n, 2), ["mov rax,[rsp]", "ret"]);
  assert.equal(x86_64.guard?.returnAddressReader, returnAddressReader);
});

test("registry lock (x86-64): lock cmpxchg in System V and Windows registers, clear by xchg", () => {
  const linux = registryLock("linux"), windows = registryLock("windows");
  assert.deepEqual(disassemble(linux.code, 0n, 3), ["mov rax,rsi", "lock cmpxchg [rdi],rdx", "ret"]);
  assert.deepEqual(disassemble(linux.code.subarray(linux.clear), 0n, 3), ["xor eax,eax", "xchg [rdi],rax", "ret"]);
  assert.deepEqual(disassemble(windows.code, 0n, 3), ["mov rax,rdx", "lock cmpxchg [rcx],r8", "ret"]);
  assert.deepEqual(disassemble(windows.code.subarray(windows.clear), 0n, 3), ["xor eax,eax", "xchg [rcx],rax", "ret"]);
});
