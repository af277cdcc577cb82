/**
 * The x86-64 guard stubs, read back with iced-x86: every instruction and every target.
 */
import { assert, test } from "./harness.ts";
import { Decoder, DecoderOptions, FastFormatter } from "iced-x86";
import { guardStub, threadPointerReader } from "../src/arch/x86_64/guard.ts";
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

function guard(os: string, parameters: NativeType[]): Uint8Array {
  return guardStub({ at: AT, data: DATA, jsThread: 0x1111n, callback: 0x2222n, original: 0x3333n, os, signature: { parameters, result: "i64" } });
}

const CHECKS_LINUX = [
  "mov r11,fs:[10h]",
  "cmp r11,[7F0000001060h]",
  "jne 7F0000001040h",
  "cmp byte ptr [7F0000002008h],0h",
  "jne 7F0000001040h",
  "mov byte ptr [7F0000002008h],1h",
];

test("guard, registers only (System V): checks, then calls the replacement with rsp aligned", () => {
  const code = guard("linux", ["i64", "pointer", "i32", "f64"]);
  assert.deepEqual(disassemble(code, AT, 12), [
    ...CHECKS_LINUX,
    "sub rsp,8h",
    "call qword ptr [7F0000001068h]",
    "add rsp,8h",
    "mov byte ptr [7F0000002008h],0h",
    "ret",
    "jmp qword ptr [7F0000001070h]",
  ]);
  const literals = new DataView(code.buffer, 96, 24);
  assert.deepEqual([0, 8, 16].map((o) => literals.getBigUint64(o, true)), [0x1111n, 0x2222n, 0x3333n]);
});

test("guard, stack arguments (7 integers): swaps the return address instead of calling", () => {
  const code = guard("linux", ["i64", "i64", "i64", "i64", "i64", "i64", "i64"]);
  const lines = disassemble(code, AT, 14);
  assert.deepEqual(lines.slice(0, 2), CHECKS_LINUX.slice(0, 2));
  assert.equal(lines[2], "jne 7F0000001053h");
  assert.deepEqual(lines.slice(6), [
    "mov r11,[rsp]",
    "mov [7F0000002000h],r11",
    "lea r11,[7F0000001046h]",
    "mov [rsp],r11",
    "jmp qword ptr [7F0000001068h]",
    "mov byte ptr [7F0000002008h],0h",
    "jmp qword ptr [7F0000002000h]",
    "jmp qword ptr [7F0000001070h]",
  ]);
});

test("guard on Windows: the TEB's self pointer, and 32 bytes of shadow space below 5 arguments", () => {
  const calling = disassemble(guard("windows", ["i64", "i64", "i64", "i64"]), AT, 8);
  assert.equal(calling[0], "mov r11,gs:[30h]");
  assert.equal(calling[6], "sub rsp,28h");
  assert.equal(disassemble(guard("windows", ["i64", "i64", "i64", "i64", "i64"]), AT, 7)[6], "mov r11,[rsp]");
});

test("the thread pointer reader reads what the guard compares", () => {
  assert.deepEqual(disassemble(threadPointerReader("linux"), 0n, 2), ["mov rax,fs:[10h]", "ret"]);
  assert.deepEqual(disassemble(threadPointerReader("windows"), 0n, 2), ["mov rax,gs:[30h]", "ret"]);
});
