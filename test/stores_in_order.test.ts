/**
 * Several stores into code by one foreign call (platform/stores_in_order.ts): the routine's
 * x86-64 code against iced-x86, the stores it makes (plain, forced, a refusal), and entries
 * written in three stores while the JS thread is given every chance to call the function
 * between them (test/fixtures/mid_write.ts): no JS runs there, so nothing waits on the jump.
 */
import { Decoder, DecoderOptions, Formatter, FormatterSyntax } from "iced-x86";
import { assert, test } from "./harness.ts";
import { runCase } from "./cases.ts";
import { bytesAt, isArm64, libc, mapPages, os, protectionAt, runtime } from "./native.ts";
import { STORES_AARCH64, STORES_X86_64, storesCode } from "../platform/stores_in_order.ts";
import { FLUSH_ROUTINE } from "../platform/aarch64_flush.ts";
import { assertDisassembly, h } from "./objdump_aarch64.ts";
import { machine } from "../src/registry.ts";
import { PROT_READ } from "../platform/mod.ts";

const linux = runtime.os === "linux" ? undefined : "Linux: the layer with the routine";
/** Whether the layer makes forced writes (Linux x86-64; arm64 makes its pages writable). */
const forcing = !isArm64;

test("stores in order: the routine, as iced-x86 reads it", () => {
  const bytes = Uint8Array.from(STORES_X86_64);
  const decoder = new Decoder(64, bytes, DecoderOptions.None);
  const formatter = new Formatter(FormatterSyntax.Nasm);
  const lines: string[] = [];
  while (decoder.canDecode) {
    const offset = decoder.position;
    const instruction = decoder.decode();
    lines.push(`${offset}: ${formatter.format(instruction)}`);
    instruction.free();
  }
  decoder.free();
  formatter.free();
  assert.deepEqual(lines, [
    "0: mov r8,rdi",
    "3: lea r9,[rdi+10h]",
    "7: mov rdx,[r9+8]",
    "11: test rdx,rdx",
    "14: je short 0000000000000050h",
    "16: mov rsi,[r9+10h]",
    "20: add rsi,r8",
    "23: mov r10,[r9]",
    "26: mov rdi,[r8]",
    "29: test rdi,rdi",
    "32: js short 0000000000000030h",
    "34: mov eax,12h",
    "39: syscall",
    "41: cmp rax,rdx",
    "44: jne short 000000000000004Ch",
    "46: jmp short 0000000000000046h",
    "48: cmp rdx,8",
    "52: jne short 000000000000003Eh",
    "54: mov rax,[rsi]",
    "57: mov [r10],rax",
    "60: jmp short 0000000000000046h",
    "62: mov rdi,r10",
    "65: mov rcx,rdx",
    "68: rep movsb",
    "70: add r9,18h",
    "74: jmp short 7",
    "76: mov [r8+8],rax",
    "80: mov rax,r9",
    "83: sub rax,r8",
    "86: ret",
  ]);
});

test("stores in order: the arm64 routine, as a reference disassembler reads it, the flush after it", () => {
  const at = 0x10000n;
  const bytes = storesCode("aarch64");
  assert.equal(bytes.length, STORES_AARCH64.length * 4);
  const flush = (STORES_AARCH64.length - FLUSH_ROUTINE.length) * 4;
  assert.equal(flush, 112);
  assertDisassembly(bytes.subarray(0, flush), at, [
    "bti c",
    "mov x5, x0",
    "mov x9, x30",
    "add x6, x0, #0x10",
    "ldr x7, [x6, #8]",
    `cbz x7, ${h(at + 100n)}`,
    "ldr x8, [x6, #16]",
    "add x8, x8, x5",
    "ldr x10, [x6]",
    "cmp x7, #0x8",
    `b.ne ${h(at + 56n)}`,
    "ldr x11, [x8]",
    "str x11, [x10]",
    `b ${h(at + 80n)}`,
    "mov x11, #0x0",
    "ldrb w12, [x8, x11]",
    "strb w12, [x10, x11]",
    "add x11, x11, #0x1",
    "cmp x11, x7",
    `b.cc ${h(at + 60n)}`,
    "mov x0, x10",
    "add x1, x10, x7",
    `bl ${h(at + BigInt(flush))}`,
    "add x6, x6, #0x18",
    `b ${h(at + 16n)}`,
    "sub x0, x6, x5",
    "mov x30, x9",
    "ret",
  ]);
});

test("stores in order: plain and forced stores, one after another; a refused one ends the sequence", () => {
  const page = mapPages(2);
  const second = page + BigInt(os.pageSize);
  try {
    const stores = [
      { address: page, bytes: Uint8Array.of(1, 2, 3, 4, 5, 6, 7, 8) },
      { address: page + 6n, bytes: Uint8Array.of(9, 9, 9, 9, 9) },
      { address: page, bytes: Uint8Array.of(10, 11, 12, 13, 14, 15, 16, 17) },
    ];
    assert.equal(os.storeInOrder!(stores, false), 3);
    assert.deepEqual([...bytesAt(page, 12)], [10, 11, 12, 13, 14, 15, 16, 17, 9, 9, 9, 0], "each over the one before");
    assert.equal(libc.mprotect(page, BigInt(2 * os.pageSize), PROT_READ), 0);
    const forced = stores.map((s) => ({ ...s, address: s.address + 64n }));
    if (!forcing) {
      assert.equal(os.storeInOrder!(forced, true), 0, "no forced writes on this layer: none made");
      assert.deepEqual([...bytesAt(page + 64n, 12)], new Array(12).fill(0));
      return;
    }
    assert.equal(os.storeInOrder!(forced, true), 3);
    assert.deepEqual([...bytesAt(page + 64n, 12)], [10, 11, 12, 13, 14, 15, 16, 17, 9, 9, 9, 0], "forced, into a read-only page");
    assert.equal(protectionAt(page), PROT_READ, "which stays read-only");
    assert.equal(libc.munmap(second, BigInt(os.pageSize)), 0);
    const refused = [
      { address: page + 128n, bytes: Uint8Array.of(1) },
      { address: second, bytes: Uint8Array.of(2) },
      { address: page + 136n, bytes: Uint8Array.of(3) },
    ];
    assert.equal(os.storeInOrder!(refused, true), 1, "the unmapped page's store ends it");
    assert.deepEqual([...bytesAt(page + 128n, 9)], [1, 0, 0, 0, 0, 0, 0, 0, 0], "the first made, the third not");
  } finally {
    libc.munmap(page, BigInt(2 * os.pageSize));
  }
}, { skip: linux });

/** What test/fixtures/mid_write.ts reports. */
interface MidWrite {
  form: number;
  during: number;
  restored: boolean;
  after: number;
  chances: number;
  whileSpinning: number;
  sequences: boolean[];
  protects: number;
}

const fixture = new URL("./fixtures/mid_write.ts", import.meta.url);

for (const meddle of ["call", "collect"] as const) {
  for (const together of [false, true]) {
    const name = together ? `${meddle}, transaction` : meddle;
    const what = meddle === "call" ? "an FFI call into the function" : "a collection";
    const how = together ? "plain stores in a transaction's writable page" : "a lone patch's stores";
    test(`stores in order: ${what} on the JS thread never meets an entry half-written (${how})`, () => {
      // Without the routine the JS thread runs between the stores, calls in, and waits on the
      // jump to itself for ever: the timeout ends the child and fails here.
      const seen = runCase(fixture, name, 30_000) as MidWrite;
      assert.equal(seen.form, machine().arch.entryJumps.at(-1)!.size, "every entry jump the longest form, three stores");
      assert.equal(seen.during, 0, "the patched lock locks and unlocks");
      assert.equal(seen.after, 0);
      assert.equal(seen.restored, true, "the bytes are back");
      assert.ok(seen.chances > 0, "JS ran around the writes");
      assert.equal(seen.whileSpinning, 0, "never while an entry jumped to itself");
      // Linux makes every store into code the mprotect way (`Os.protectFrom`): plain stores, a lone
      // patch's too; the routine's forced stores are tested on their own above.
      assert.deepEqual(seen.sequences, new Array(together ? 4 : 2).fill(false), "each entry's stores in one call, plain");
      assert.ok(seen.protects > 0, "the page made writable and back");
    }, { skip: linux });
  }
}
