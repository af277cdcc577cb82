/** The x86-64 length decoder on hand-picked encodings; `x86_64_differential.test.ts` goes wide. */
import { assert, test } from "./harness.ts";
import { decode, type Instruction } from "../src/arch/x86_64/decoder.ts";
import { RedefineError } from "../src/errors.ts";

const AT = 0x7f12_3456_0000n;

/** Bytes from `"48 89 e5"` notation. */
function bytes(text: string): Uint8Array {
  return Uint8Array.from(text.split(" ").filter(Boolean), (b) => parseInt(b, 16));
}

function decodeHex(text: string, address = AT): Instruction {
  return decode(bytes(text), 0, address);
}

test("decoder: lengths across prefixes, REX and immediate size rules", () => {
  const lengths: [string, number, string][] = [
    ["90", 1, "nop"],
    ["41 57", 2, "push r15"],
    ["48 89 e5", 3, "mov rbp, rsp"],
    ["48 83 ec 10", 4, "sub rsp, 0x10"],
    ["48 81 ec 00 01 00 00", 7, "sub rsp, 0x100"],
    ["66 81 f9 34 12", 5, "cmp cx, imm16: 66 shrinks iz"],
    ["66 48 81 f9 78 56 34 12", 8, "REX.W beats 66: imm32"],
    ["48 66 81 f9 34 12", 6, "a REX before a legacy prefix is ignored: imm16"],
    ["66 c7 00 34 12", 5, "mov word [rax], imm16"],
    ["b8 78 56 34 12", 5, "mov eax, imm32"],
    ["66 b8 34 12", 4, "mov ax, imm16"],
    ["48 b8 01 02 03 04 05 06 07 08", 10, "mov rax, imm64"],
    ["49 bb 01 02 03 04 05 06 07 08", 10, "mov r11, imm64"],
    ["a0 01 02 03 04 05 06 07 08", 9, "mov al, moffs64"],
    ["67 a1 01 02 03 04", 6, "mov eax, moffs32"],
    ["48 a3 01 02 03 04 05 06 07 08", 10, "mov moffs64, rax"],
    ["f6 c1 01", 3, "test cl, 1"],
    ["f6 d1", 2, "not cl: no immediate"],
    ["f7 c1 01 00 00 00", 6, "test ecx, imm32"],
    ["66 f7 c1 01 00", 5, "test cx, imm16"],
    ["48 f7 04 24 01 00 00 00", 8, "test qword [rsp], imm32"],
    ["f7 d8", 2, "neg eax"],
    ["69 c0 00 01 00 00", 6, "imul eax, eax, imm32"],
    ["6b c0 10", 3, "imul eax, eax, imm8"],
    ["68 00 01 00 00", 5, "push imm32"],
    ["c8 10 00 01", 4, "enter 0x10, 1"],
    ["c2 08 00", 3, "ret 8"],
    ["f3 0f 1e fa", 4, "endbr64"],
    ["66 2e 0f 1f 84 00 00 00 00 00", 10, "cs nop word [rax+rax+0]"],
    ["8b 04 24", 3, "mov eax, [rsp]"],
    ["8b 44 24 08", 4, "mov eax, [rsp+8]"],
    ["8b 84 24 00 01 00 00", 7, "mov eax, [rsp+0x100]"],
    ["8b 04 25 00 10 00 00", 7, "mov eax, [0x1000]: SIB without base, not RIP-relative"],
    ["8b 45 00", 3, "mov eax, [rbp+0]"],
    ["0f 20 00", 3, "mov rax, cr0: mod is ignored"],
    ["0f ba e0 05", 4, "bt eax, 5"],
    ["0f a4 c2 03", 4, "shld edx, eax, 3"],
    ["0f 0f c1 b4", 4, "pfmul mm0, mm1 (3DNow!)"],
    ["66 0f 78 c0 01 02", 6, "extrq xmm0, 1, 2"],
    ["f2 0f 78 c1 01 02", 6, "insertq xmm0, xmm1, 1, 2"],
    ["0f 78 c0", 3, "vmread rax, rax"],
    ["66 0f 38 00 c1", 5, "pshufb xmm0, xmm1"],
    ["66 0f 3a 0f c1 08", 6, "palignr xmm0, xmm1, 8"],
    ["c5 f8 77", 3, "vzeroupper"],
    ["c5 fd 70 c1 1b", 5, "vpshufd ymm0, ymm1, 0x1b"],
    ["c4 e3 79 0f c1 04", 6, "vpalignr xmm0, xmm0, xmm1, 4"],
    ["c4 e2 7d 18 44 24 08", 7, "vbroadcastss ymm0, [rsp+8]"],
    ["62 f1 7c 48 10 44 24 01", 8, "vmovups zmm0, [rsp+0x40] (disp8*N)"],
    ["62 f3 7d 48 1e c1 05", 7, "vpcmpud k0, zmm0, zmm1, 5"],
    ["8f e8 78 c0 c1 05", 6, "vprotb xmm0, xmm1, 5 (XOP map 8)"],
    ["8f ea 78 10 c0 01 02 03 04", 9, "bextr eax, eax, imm32 (XOP map 10)"],
    ["8f 00", 2, "pop qword [rax]: 8F that is not XOP"],
    ["66 66 66 66 66 66 66 66 66 66 66 66 66 66 90", 15, "15 bytes is the limit"],
  ];
  for (const [text, length, what] of lengths) {
    const insn = decodeHex(text + " cc cc");
    assert.equal(insn.length, length, what);
    assert.deepEqual(insn.bytes, bytes(text), what);
    assert.equal(insn.branch, undefined, what);
    assert.equal(insn.ripRelative, undefined, what);
  }
});

test("decoder: decodes at an offset and reports the given address", () => {
  const code = bytes("55 48 89 e5 c3");
  const insn = decode(code, 1, 0x1001n);
  assert.equal(insn.address, 0x1001n);
  assert.equal(insn.length, 3);
  assert.equal(decode(code, 4, 0x1004n).flow, "ret");
});

test("decoder: RIP-relative operands, with the displacement's offset and the target", () => {
  const cases: [string, number, bigint, string][] = [
    ["48 8b 05 10 00 00 00", 3, 0x17n, "mov rax, [rip+0x10]"],
    ["48 8d 0d f9 ff ff ff", 3, 0n, "lea rcx, [rip-7]"],
    ["41 8b 05 00 01 00 00", 3, 0x107n, "mov eax, [rip+0x100]: REX.B does not make it r13"],
    ["c7 05 f0 ff ff ff 78 56 34 12", 2, -6n, "mov dword [rip-0x10], imm32"],
    ["66 c7 05 00 00 00 00 34 12", 3, 9n, "mov word [rip], imm16"],
    ["80 3d 00 00 00 00 00", 2, 7n, "cmp byte [rip], 0: target counts the imm8"],
    ["ff 25 00 00 00 00", 2, 6n, "jmp [rip]"],
    ["c5 f9 6f 05 00 00 00 00", 4, 8n, "vmovdqa xmm0, [rip]"],
    ["62 f1 7c 48 10 05 00 00 00 00", 6, 10n, "vmovups zmm0, [rip] (never compressed)"],
    ["c4 e3 79 0f 05 00 00 00 00 04", 5, 10n, "vpalignr xmm0, xmm0, [rip], 4"],
  ];
  for (const [text, dispOffset, relativeTarget, what] of cases) {
    const insn = decodeHex(text);
    assert.equal(insn.length, bytes(text).length, what);
    assert.deepEqual(insn.ripRelative, { dispOffset, target: AT + relativeTarget }, what);
  }
  const eip = decodeHex("67 8b 05 00 00 00 00", 0x1_0000_1000n);
  assert.equal(eip.ripRelative?.target, 0x1007n, "67: the address wraps at 32 bits");
});

test("decoder: every relative branch kind, with its target, displacement and condition", () => {
  const cases: [string, Instruction["branch"], Instruction["flow"]][] = [
    ["eb 10", { kind: "jmp", target: AT + 0x12n, relOffset: 1, relSize: 1 }, "jmp"],
    ["e9 00 01 00 00", { kind: "jmp", target: AT + 0x105n, relOffset: 1, relSize: 4 }, "jmp"],
    ["f2 e9 00 00 00 00", { kind: "jmp", target: AT + 6n, relOffset: 2, relSize: 4 }, "jmp"],
    ["66 e9 00 00 00 00", { kind: "jmp", target: AT + 6n, relOffset: 2, relSize: 4 }, "jmp"],
    ["e8 fb ff ff ff", { kind: "call", target: AT, relOffset: 1, relSize: 4 }, "normal"],
    ["74 fe", { kind: "jcc", target: AT, relOffset: 1, relSize: 1, condition: 4 }, "normal"],
    [
      "3e 7f 00",
      { kind: "jcc", target: AT + 3n, relOffset: 2, relSize: 1, condition: 15 },
      "normal",
    ],
    ["0f 85 00 00 00 80", {
      kind: "jcc",
      target: AT + 6n - 0x8000_0000n,
      relOffset: 2,
      relSize: 4,
      condition: 5,
    }, "normal"],
    ["e2 fe", { kind: "loop", target: AT, relOffset: 1, relSize: 1 }, "normal"],
    ["e1 02", { kind: "loop", target: AT + 4n, relOffset: 1, relSize: 1 }, "normal"],
    ["e0 02", { kind: "loop", target: AT + 4n, relOffset: 1, relSize: 1 }, "normal"],
    ["e3 02", { kind: "jrcxz", target: AT + 4n, relOffset: 1, relSize: 1 }, "normal"],
    ["67 e3 02", { kind: "jrcxz", target: AT + 5n, relOffset: 2, relSize: 1 }, "normal"],
    [
      "c7 f8 00 01 00 00",
      { kind: "xbegin", target: AT + 0x106n, relOffset: 2, relSize: 4 },
      "normal",
    ],
    ["66 c7 f8 00 01", { kind: "xbegin", target: AT + 0x105n, relOffset: 3, relSize: 2 }, "normal"],
  ];
  for (const [text, branch, flow] of cases) {
    const insn = decodeHex(text);
    assert.equal(insn.length, bytes(text).length, text);
    assert.deepEqual(insn.branch, branch, text);
    assert.equal(insn.flow, flow, text);
  }
  assert.equal(decodeHex("eb 80", 0x10n).branch?.target, 2n ** 64n - 0x6en, "wraps around zero");
});

test("decoder: control flow of returns, jumps, traps and system calls", () => {
  const flows: [string, Instruction["flow"]][] = [
    ["c3", "ret"],
    ["f3 c3", "ret"],
    ["c2 08 00", "ret"],
    ["cb", "ret"],
    ["ff e0", "jmp"],
    ["41 ff 24 24", "jmp"],
    ["ff 15 00 00 00 00", "normal"],
    ["ff d0", "normal"],
    ["cc", "int3"],
    ["0f 05", "syscall"],
    ["0f 0b", "ud"],
    ["0f b9 00", "ud"],
    ["f4", "normal"],
  ];
  for (const [text, flow] of flows) assert.equal(decodeHex(text).flow, flow, text);
});

test("decoder: refuses what is no instruction in 64-bit mode, naming address and bytes", () => {
  const invalid = [
    "06", //          push es
    "27", //          daa
    "60", //          pusha
    "9a 00 00 00 00 00 00", // call far
    "ce", //          into
    "d4 0a", //       aam
    "ea 00 00 00 00 00 00", // jmp far
    "0f 24 c0", //    mov r, tr
    "0f 36", //       undefined
    "66 c5 f8 77", // VEX after 66
    "48 c5 f8 77", // VEX after REX
    "c4 e0 78 77", // VEX map 0
    "62 f1 78 08 10 c0", // EVEX with bit 2 of P1 clear
    "62 f4 7c 48 10 c0", // EVEX map 4
    "66 66 66 66 66 66 66 66 66 66 66 66 66 66 66 90", // 16 bytes
  ];
  for (const text of invalid) {
    assert.throws(() => decodeHex(text + " cc"), (error: unknown) => {
      assert.ok(error instanceof RedefineError, text);
      assert.equal(error.code, "UNRELOCATABLE", text);
      assert.match(error.message, /0x7f1234560000/, text);
      assert.ok(error.message.includes(text.slice(0, 2)), `${text}: ${error.message}`);
      return true;
    });
  }
});

test("decoder: refuses instructions cut short by the end of the code", () => {
  const truncated = [
    "48",
    "66",
    "0f",
    "0f 38",
    "c5 f8",
    "62 f1 7c",
    "e9 00 00",
    "48 b8 01 02 03",
    "8b 04",
    "8b 05 00 00 00",
    "c7 05 00 00 00 00 01 02 03",
    "f6 c1",
    "8f",
  ];
  for (const text of truncated) {
    assert.throws(() => decodeHex(text), (error: unknown) => {
      assert.ok(error instanceof RedefineError && error.code === "UNRELOCATABLE", text);
      assert.match(error.message, /past the end/, text);
      return true;
    });
  }
});
