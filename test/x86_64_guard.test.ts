/**
 * The x86-64 guard stubs and the registry lock, read back with iced-x86: every instruction and
 * every target.
 */
import { assert, test } from "./harness.ts";
import { Decoder, DecoderOptions, FastFormatter } from "iced-x86";
import { guardLayout, guardStub, threadPointerReader } from "../src/arch/x86_64/guard.ts";
import { registryLock } from "../src/arch/x86_64/registry_lock.ts";
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

function guard(os: string, parameters: NativeType[]) {
  const signature = { parameters, result: "i64" as const };
  const layout = guardLayout(os, signature);
  const { code, data } = guardStub({
    at: AT, data: DATA, identity: 0x1111n, callback: 0x2222n, original: 0x3333n, os, signature,
    shared: layout.shared ? SHARED : undefined,
  });
  return { layout, code, data };
}

test("calling guard (nothing on the stack): a 12-byte thunk per patch, its record, one shared body", () => {
  const { layout, code, data } = guard("linux", ["i64", "pointer", "i32", "f64"]);
  assert.equal(layout.size, 12);
  assert.equal(code.length, 12);
  assert.deepEqual(disassemble(code, AT, 2), ["lea r11,[7F0000002000h]", "jmp 7F0000001800h"]);
  const record = new DataView(data.buffer);
  assert.deepEqual([0, 8, 16].map((o) => record.getBigUint64(o, true)), [0x1111n, 0x2222n, 0x3333n]);
  assert.equal(data[layout.busyOffset], 0, "not busy");
  assert.deepEqual(disassemble(layout.shared!, SHARED, 15), [
    "push r11",
    "mov r11,[r11]", // the identity word's address, from the record
    "mov r11,[r11]", // the JS thread, 0 once the isolate ended
    "cmp r11,fs:[10h]",
    "pop r11",
    "jne 7F0000001838h",
    "cmp byte ptr [r11+18h],0h",
    "jne 7F0000001838h",
    "mov byte ptr [r11+18h],1h",
    "push r11",
    "call qword ptr [r11+8h]",
    "pop r11",
    "and byte ptr [r11+18h],0FEh", // clears the running bit, keeps the retired one
    "ret",
    "jmp qword ptr [r11+10h]",
  ]);
  assert.equal(layout.shared!.length, 0x3c, "to_original (the last instruction) at +0x38");
});

test("swapping guard (stack arguments, 7 integers): keeps the return address aside instead of calling", () => {
  const { layout, code } = guard("linux", ["i64", "i64", "i64", "i64", "i64", "i64", "i64"]);
  assert.equal(layout.shared, null);
  const lines = disassemble(code, AT, 15);
  assert.deepEqual(lines.slice(0, 7), [
    "mov r11,[7F0000001060h]",
    "mov r11,[r11]",
    "cmp r11,fs:[10h]",
    "jne 7F0000001056h",
    "cmp byte ptr [7F0000002008h],0h",
    "jne 7F0000001056h",
    "mov byte ptr [7F0000002008h],1h",
  ]);
  assert.deepEqual(lines.slice(7), [
    "mov r11,[rsp]",
    "mov [7F0000002000h],r11",
    "lea r11,[7F0000001049h]",
    "mov [rsp],r11",
    "jmp qword ptr [7F0000001068h]",
    "and byte ptr [7F0000002008h],0FEh",
    "jmp qword ptr [7F0000002000h]",
    "jmp qword ptr [7F0000001070h]",
  ]);
  assert.equal(new DataView(code.buffer).getBigUint64(0x60, true), 0x1111n, "the identity word's address");
});

test("guard on Windows: the TEB's self pointer, and 32 bytes of shadow space below 5 arguments", () => {
  const { layout } = guard("windows", ["i64", "i64", "i64", "i64"]);
  const shared = disassemble(layout.shared!, SHARED, 12);
  assert.equal(shared[3], "cmp r11,gs:[30h]");
  assert.deepEqual(shared.slice(9, 12), ["push r11", "sub rsp,20h", "call qword ptr [r11+8h]"]);
  assert.equal(guard("windows", ["i64", "i64", "i64", "i64", "i64"]).layout.shared, null, "a fifth argument goes on the stack");
});

test("the thread pointer reader reads what the guard compares", () => {
  assert.deepEqual(disassemble(threadPointerReader("linux"), 0n, 2), ["mov rax,fs:[10h]", "ret"]);
  assert.deepEqual(disassemble(threadPointerReader("windows"), 0n, 2), ["mov rax,gs:[30h]", "ret"]);
});

test("registry lock (x86-64): lock cmpxchg in System V and Windows registers, clear by xchg", () => {
  const linux = registryLock("linux"), windows = registryLock("windows");
  assert.deepEqual(disassemble(linux.code, 0n, 3), ["mov rax,rsi", "lock cmpxchg [rdi],rdx", "ret"]);
  assert.deepEqual(disassemble(linux.code.subarray(linux.clear), 0n, 3), ["xor eax,eax", "xchg [rdi],rax", "ret"]);
  assert.deepEqual(disassemble(windows.code, 0n, 3), ["mov rax,rdx", "lock cmpxchg [rcx],r8", "ret"]);
  assert.deepEqual(disassemble(windows.code.subarray(windows.clear), 0n, 3), ["xor eax,eax", "xchg [rcx],rax", "ret"]);
});
