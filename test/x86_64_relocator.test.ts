/**
 * The x86-64 prologue relocator. Every trampoline is read back with iced-x86 and reduced to what
 * it does (plain bytes, branch kinds and absolute targets, RIP-relative targets), which must match
 * what the original instructions did.
 */
import { ConditionCode, Decoder, DecoderOptions, FlowControl, OpKind } from "iced-x86";
import { assert, test } from "./harness.ts";
import { planRelocation, relocate } from "../src/arch/x86_64/relocator.ts";
import { x86_64 } from "../src/arch/x86_64/mod.ts";
import { RedefineError } from "../src/errors.ts";
import { elfFunctions, findLibrary } from "./elf_file.ts";
import { readFileSync } from "node:fs";
import { log } from "node:console";
import { isArm64 } from "./native.ts";
import { runRelocated } from "./live_trampoline.ts";

const AT = 0x7f12_3456_0000n;
const NEAR = AT + 0x10_0000n;
const FAR = AT + 2n ** 40n;

function bytes(text: string): Uint8Array {
  return Uint8Array.from(text.split(" ").filter(Boolean), (b) => parseInt(b, 16));
}

function le32(value: number): string {
  return Array.from({ length: 4 }, (_, i) => ((value >>> (8 * i)) & 0xff).toString(16)).join(" ");
}

/** What one instruction does, independent of where it sits. */
type Effect =
  | { plain: string }
  | { pushed: bigint }
  | { rip: bigint; rest: string }
  | {
    branch: "jmp" | "call" | "jcc" | "loop";
    condition: number;
    target: bigint | { internal: number };
  };

/**
 * Reads `code` placed at `address` with iced-x86. The trampoline's multi-instruction forms (an
 * absolute jump with its literal, an inverted jcc over an absolute jump, the push of a 64-bit
 * return address) count as one effect. Targets inside `code` become `{ internal: index }` of the
 * effect there.
 */
function effects(code: Uint8Array, address: bigint, count = Infinity): Effect[] {
  const found: { offset: number; effect: Effect }[] = [];
  const literal = (at: number) =>
    new DataView(code.buffer, code.byteOffset + at).getBigUint64(0, true);
  const startsWith = (at: number, text: string) => bytes(text).every((b, i) => code[at + i] === b);
  const decoder = new Decoder(64, code, DecoderOptions.None);
  for (let offset = 0; offset < code.length && found.length < count;) {
    let effect: Effect;
    let length: number;
    if (startsWith(offset, "ff 25 00 00 00 00")) {
      effect = { branch: "jmp", condition: 0, target: literal(offset + 6) };
      length = 14;
    } else if (code[offset] === 0x68 && startsWith(offset + 5, "c7 44 24 04")) {
      // push imm32; mov dword [rsp+4], imm32
      const half = (at: number) => BigInt(new DataView(code.buffer, code.byteOffset + at).getUint32(0, true));
      effect = { pushed: half(offset + 1) + (half(offset + 9) << 32n) };
      length = 13;
    } else if ((code[offset] & 0xf0) === 0x70 && startsWith(offset + 1, "0e ff 25 00 00 00 00")) {
      effect = { branch: "jcc", condition: (code[offset] & 0x0f) ^ 1, target: literal(offset + 8) };
      length = 16;
    } else {
      decoder.position = offset;
      decoder.ip = address + BigInt(offset);
      const insn = decoder.decode();
      assert.ok(!insn.isInvalid, `invalid instruction at +${offset} of ${code.join(",")}`);
      length = insn.length;
      const text = Array.from(code.subarray(offset, offset + length), (b) => b.toString(16)).join(
        " ",
      );
      if ([OpKind.NearBranch16, OpKind.NearBranch32, OpKind.NearBranch64].includes(insn.op0Kind)) {
        const flow = insn.flowControl;
        const jcc = insn.conditionCode !== ConditionCode.None;
        effect = {
          branch: flow === FlowControl.Call
            ? "call"
            : jcc
            ? "jcc"
            : flow === FlowControl.ConditionalBranch
            ? "loop"
            : "jmp",
          condition: jcc ? insn.conditionCode - 1 : 0,
          target: insn.nearBranchTarget,
        };
      } else if (insn.isIpRelMemoryOperand) {
        const offsets = decoder.getConstantOffsets(insn);
        const rest = code.slice(offset, offset + length);
        rest.fill(0, offsets.displacementOffset, offsets.displacementOffset + 4);
        offsets.free();
        effect = { rip: insn.ipRelMemoryAddress, rest: rest.join(" ") };
      } else {
        effect = { plain: text };
      }
      insn.free();
    }
    found.push({ offset, effect });
    offset += length;
  }
  decoder.free();
  for (const { effect } of found) {
    if ("branch" in effect && typeof effect.target === "bigint") {
      const index = found.findIndex((f) => address + BigInt(f.offset) === effect.target);
      if (index >= 0 && index < count) effect.target = { internal: index };
    }
  }
  return found.map((f) => f.effect);
}

/**
 * Relocates and checks: the plan's bound holds, and the trampoline does what the first `copied`
 * original instructions did, then jumps back to the first one left in place. A copy ending in a
 * call pushes that place as the return address and jumps to the callee instead.
 */
function check(
  code: Uint8Array,
  minLength: number,
  trampoline: bigint,
  copied: number,
  address = AT,
): Uint8Array {
  const plan = planRelocation(code, address, minLength);
  const out = relocate(plan, trampoline);
  assert.ok(out.length <= plan.maxSize, `${out.length} bytes > maxSize ${plan.maxSize}`);
  assert.equal(effects(code.subarray(0, plan.consumed), address).length, copied, "instructions");
  // Targets inside the copy are compared as indexes; the jump back is the entry after the copy.
  const end = address + BigInt(plan.consumed);
  const expected = effects(code, address, copied);
  const last = expected[expected.length - 1];
  if ("branch" in last && last.branch === "call") {
    expected.splice(-1, 1, { pushed: end }, { ...last, branch: "jmp" });
  } else {
    expected.push({ branch: "jmp", condition: 0, target: end });
  }
  assert.deepEqual(effects(out, trampoline), expected);
  return out;
}

function assertRefused(fn: () => unknown, pattern: RegExp, code = "UNRELOCATABLE"): void {
  assert.throws(fn, (error: unknown) => {
    assert.ok(error instanceof RedefineError, String(error));
    assert.equal(error.code, code);
    assert.match(error.message, pattern);
    return true;
  });
}

/** The sizes of a plan, without its decoded instructions. */
function sizes(plan: { consumed: number; maxSize: number }): { consumed: number; maxSize: number } {
  return { consumed: plan.consumed, maxSize: plan.maxSize };
}

const PROLOGUE = bytes("55 48 89 e5 48 83 ec 10 c3");

test("relocator: plain prologue, jump back near and far", () => {
  assert.deepEqual(sizes(planRelocation(PROLOGUE, AT, 5)), { consumed: 8, maxSize: 8 + 14 });
  const near = check(PROLOGUE, 5, NEAR, 3);
  assert.deepEqual(near.subarray(0, 8), PROLOGUE.subarray(0, 8));
  assert.equal(near.length, 8 + 5);
  assert.equal(check(PROLOGUE, 5, FAR, 3).length, 8 + 14);
  assert.deepEqual(sizes(planRelocation(PROLOGUE, AT, 1)), { consumed: 1, maxSize: 1 + 14 });
  assert.equal(planRelocation(PROLOGUE, AT, 9).consumed, 9);
});

test("relocator: RIP-relative displacement rewritten, refused beyond ±2 GiB", () => {
  // mov rax, [rip+0x100]; cmp byte [rip-0x20], 1; ret
  const code = bytes("48 8b 05 00 01 00 00 80 3d e0 ff ff ff 01 c3");
  const target = AT + 7n + 0x100n;
  const out = check(code, 8, NEAR, 2);
  assert.deepEqual(out.subarray(0, 7), bytes(`48 8b 05 ${le32(Number(target - (NEAR + 7n)))}`));
  check(code, 8, AT - 0x7fff_0000n, 2);
  // The last trampoline that still reaches `target` from the end of the first instruction.
  check(code.subarray(0, 7), 5, target + 2n ** 31n - 7n, 1);
  assertRefused(
    () => relocate(planRelocation(code.subarray(0, 7), AT, 5), target + 2n ** 31n - 6n),
    /0x7f1234560000 \(48 8b 05 00 01 00 00\).*relative to the instruction pointer.*trampoline/,
  );
  assertRefused(() => relocate(planRelocation(code, AT, 8), FAR), /out of ±2 GiB reach/);
});

test("relocator: jmp rel8 and rel32 leaving the copy, as rel32 or absolute", () => {
  const code = bytes("eb 40 90 90 90 90 e9 00 10 00 00 90");
  check(code, 5, NEAR, 4);
  check(code, 5, FAR, 4);
  check(code, 11, NEAR, 6);
  const far = check(code, 11, FAR, 6);
  assert.deepEqual(far.subarray(0, 6), bytes("ff 25 00 00 00 00"));
  assert.equal(planRelocation(code, AT, 11).maxSize, 14 + 4 + 14 + 14);
});

test("relocator: jcc leaving the copy, as jcc rel32 or inverted over an absolute jump", () => {
  // test edi, edi; je +0x40; jg rel32 +0x1000; ret
  const code = bytes("85 ff 74 40 0f 8f 00 10 00 00 c3");
  const near = check(code, 5, NEAR, 3);
  assert.deepEqual(near.subarray(2, 4), bytes("0f 84"));
  const far = check(code, 5, FAR, 3);
  assert.deepEqual(far.subarray(2, 10), bytes("75 0e ff 25 00 00 00 00"), "jne over jmp [rip]");
  assert.deepEqual(far.subarray(18, 26), bytes("7e 0e ff 25 00 00 00 00"), "jle over jmp [rip]");
  assert.equal(planRelocation(code, AT, 5).maxSize, 2 + 16 + 16 + 14);
  // Every condition, forward and backward.
  for (let condition = 0; condition < 16; condition++) {
    const jcc = Uint8Array.of(0x70 | condition, condition % 2 ? 0x80 : 0x7f, 0x90, 0x90, 0x90);
    check(jcc, 5, NEAR, 4);
    check(jcc, 5, FAR, 4);
  }
});

test("relocator: a call ending the copy pushes the original return address, then jumps", () => {
  // call +0x1000; mov edi, eax; ret
  const code = bytes("e8 00 10 00 00 89 c7 c3");
  const pushed = `68 ${le32(Number((AT + 5n) % 2n ** 32n))} c7 44 24 04 ${le32(Number((AT + 5n) / 2n ** 32n))}`;
  const near = check(code, 5, NEAR, 1);
  assert.deepEqual(near, bytes(`${pushed} e9 ${le32(Number(AT + 0x1005n - (NEAR + 18n)))}`));
  const far = check(code, 5, FAR, 1);
  assert.deepEqual(far.subarray(0, 19), bytes(`${pushed} ff 25 00 00 00 00`));
  assert.equal(far.length, 13 + 14, "no jump back: the callee returns to the original");
  assert.equal(planRelocation(code, AT, 5).maxSize, 13 + 14);
  // A push imm32 alone would sign-extend: the high half must be written for any address.
  const high = 0xffff_8000_1234_5000n;
  assert.deepEqual(check(code, 5, high + 0x100n, 1, high).subarray(0, 13), bytes(
    `68 ${le32(0x1234_5005)} c7 44 24 04 ${le32(0xffff_8000)}`,
  ));
});

test("relocator: a call followed by more copied instructions is refused", () => {
  // call +0x1000; mov edi, eax; ret: the callee would return into the overwritten bytes
  assertRefused(
    () => planRelocation(bytes("e8 00 10 00 00 89 c7 c3"), AT, 7),
    /\(e8 00 10 00 00\): it is a call returning to 0x7f1234560005, inside the 7 bytes the patch overwrites at 0x7f1234560000/,
  );
  // funchook's x86_test_call_get_pc_thunk_bx, in 64 bits: push rbx; call thunk; add rbx, imm32
  assertRefused(() => planRelocation(bytes("53 e8 00 01 00 00 48 81 c3 00 10 00 00 5b c3"), AT, 14), /call returning/);
});

test("relocator: code that reads its own return address sees the original's", () => {
  // Frida's fixture: call +0; pop rcx — rcx must hold the original address after the call.
  check(bytes("e8 00 00 00 00 59 c3"), 5, NEAR, 1);
  check(bytes("e8 00 00 00 00 59 c3"), 5, FAR, 1);
  // funchook's get_pc_thunk shapes, in 64 bits: call thunk (its first instruction reads [rsp]),
  // and push rbx; call thunk, both moved whole by a 5-byte patch.
  check(bytes("e8 0b 00 00 00 48 05 00 10 00 00 8b 00 c3"), 5, NEAR, 1);
  check(bytes("53 e8 0b 00 00 00 48 81 c3 00 10 00 00 5b c3"), 5, FAR, 2);
  // A call to the start of the copy (a loop through the patch point) goes to the copy.
  check(bytes("90 90 90 90 e8 f7 ff ff ff c3"), 9, NEAR, 5);
});

test("relocator: a relocated call that reads its return address gets the original's, run live", () => {
  if (isArm64) return;
  const getPc = runRelocated(x86_64, [
    0xe8, 0, 0, 0, 0, // call +0
    0x58, //             pop rax: the address after the call
    0xc3, //             ret
  ], 5);
  assert.equal(getPc.result, getPc.address + 5n);
  const thunk = runRelocated(x86_64, [
    0x53, //                   push rbx
    0xe8, 0x05, 0, 0, 0, //    call thunk
    0x48, 0x89, 0xd8, //       mov rax, rbx
    0x5b, //                   pop rbx
    0xc3, //                   ret
    0x48, 0x8b, 0x1c, 0x24, // thunk: mov rbx, [rsp]
    0xc3, //                   ret
  ], 5);
  assert.equal(thunk.result, thunk.address + 6n);
});

test("relocator: branches inside the copied bytes stay inside, re-pointed at the copy", () => {
  // 0: test edi, edi; 2: je 6; 4: xor eax, eax; 6: nop
  const code = bytes("85 ff 74 02 31 c0 90 c3");
  const near = check(code, 7, NEAR, 4);
  assert.deepEqual(near.subarray(2, 8), bytes("0f 84 02 00 00 00"), "je over the xor of the copy");
  check(code, 7, FAR, 4);
  // A loop back to the patch point runs in the copy, not through the patched entry.
  // 0: dec ecx; 2: jne 0; 4: jmp 0; 6: ret
  const loop = bytes("ff c9 75 fc eb fa c3");
  const out = check(loop, 5, FAR, 3);
  assert.deepEqual(out.subarray(2, 13), bytes("0f 85 f8 ff ff ff e9 f3 ff ff ff"));
  assert.equal(planRelocation(loop, AT, 5).maxSize, 2 + 6 + 5 + 14);
});

test("relocator: loop and jrcxz kept inside the copy, refused when leaving it", () => {
  // 0: jrcxz 4; 2: jmp 4; 4: nop; 5: loop 0; 7: ret
  const code = bytes("e3 02 eb 00 90 e2 f9 c3");
  const out = check(code, 7, NEAR, 4);
  assert.deepEqual(out.subarray(0, 2), bytes("e3 05"), "jrcxz over the widened jmp");
  assert.deepEqual(out.subarray(8, 10), bytes("e2 f6"));
  assert.deepEqual(check(bytes("67 e3 00 90 90 90"), 5, FAR, 3).subarray(0, 3), bytes("67 e3 00"));
  assertRefused(
    () => planRelocation(bytes("e2 10 90 90 90 90"), AT, 5),
    /loop has only a rel8 form/,
  );
  assertRefused(() => planRelocation(bytes("90 e3 f0 90 90 90"), AT, 5), /jrcxz/);
  assertRefused(() => planRelocation(bytes("e3 03 90 90 90 90"), AT, 5), /jrcxz/);
  // Over seven jcc that may each become 16 bytes, a jrcxz still reaches; over eight it may not.
  const over = (count: number) =>
    bytes(`e3 ${(2 * count).toString(16)} ${"74 7f ".repeat(count)} 90`);
  check(over(7), 17, FAR, 9);
  assertRefused(() => planRelocation(over(8), AT, 19), /jrcxz cannot reach its target/);
});

test("relocator: refuses branches into the middle of the overwritten bytes", () => {
  // push rbp; mov rbp, rsp; nop; nop; ... jmp back
  const into = (target: number) => {
    const code = bytes("55 48 89 e5 90 90 90 90 eb 00 c3");
    code[9] = (target - 10) & 0xff;
    return code;
  };
  assertRefused(
    () => planRelocation(into(1), AT, 5),
    /\(eb f7\): it branches to 0x7f1234560001, inside the 5 bytes/,
  );
  assertRefused(() => planRelocation(into(4), AT, 5), /inside the 5 bytes/);
  assert.equal(planRelocation(into(0), AT, 5).consumed, 5, "to the patch point");
  assert.equal(planRelocation(into(5), AT, 5).consumed, 5, "to the first byte left in place");
  // The scan stops at bytes that do not decode: what follows may be data.
  assert.equal(planRelocation(bytes("55 48 89 e5 90 06 eb f6"), AT, 5).consumed, 5);
  // A copied branch into the middle of a copied instruction.
  assertRefused(() => planRelocation(bytes("eb 01 b8 00 00 00 00"), AT, 5), /middle of a copied/);
});

test("relocator: refuses undecodable bytes, xbegin and too short a function", () => {
  assertRefused(() => planRelocation(bytes("55 06 90 90 90"), AT, 5), /0x7f1234560001 \(06\)/);
  assertRefused(() => planRelocation(bytes("55 48 89"), AT, 3), /past the end of the function/);
  assertRefused(() => planRelocation(bytes("c7 f8 00 00 00 00"), AT, 5), /xbegin/);
  assertRefused(
    () => planRelocation(bytes("55 c3"), AT, 5),
    /has 2 bytes.*needs 5/,
    "FUNCTION_TOO_SHORT",
  );
});

test("relocator: copies past a ret when the function's extent goes on", () => {
  // xor eax, eax; ret; then the bytes of another block of the same function
  const code = bytes("31 c0 c3 48 8b 05 00 01 00 00 c3");
  check(code, 5, NEAR, 3);
});

test("relocator: the plan bounds the trampoline wherever it lands", () => {
  let state = 0x9e3779b9;
  const random = (n: number) => {
    state ^= state << 13;
    state ^= state >>> 17;
    state ^= state << 5;
    return (state >>> 0) % n;
  };
  const PLAIN = [
    "55",
    "48 89 e5",
    "48 83 ec 18",
    "41 57",
    "90",
    "66 0f 1f 44 00 00",
    "31 c0",
    "c3",
  ];
  const RIP = ["48 8b 05", "48 8d 0d", "ff 25", "c5 f9 6f 05"];
  const BRANCH: [string, number][] = [["eb", 1], ["e9", 4], ["74", 1], ["0f 8c", 4], ["e8", 4], [
    "e3",
    1,
  ]];
  const trampolines = (has: { rip: boolean; branch: boolean }) => [
    NEAR,
    AT - 0x1000n,
    ...(has.rip ? [] : [FAR, AT - 2n ** 35n, 0x1000n]),
    ...(has.branch && !has.rip ? [AT + 2n ** 31n - 64n, AT - 2n ** 31n + 64n] : []),
  ];
  let trampolinesChecked = 0;
  for (let round = 0; round < 2000; round++) {
    const minLength = random(2) ? 5 : 14;
    const pieces: { text: string; rel?: number }[] = [];
    let length = 0;
    const has = { rip: false, branch: false };
    while (length < minLength + 20) {
      const kind = random(3);
      let text: string;
      let rel: number | undefined;
      if (kind === 0) {
        text = PLAIN[random(PLAIN.length)];
      } else if (kind === 1 && random(3) === 0) {
        text = `${RIP[random(RIP.length)]} ${le32(random(0x20_0000) - 0x10_0000)}`;
        has.rip ||= length < minLength;
      } else {
        [text, rel] = BRANCH[random(BRANCH.length)];
        text += " 00".repeat(rel);
      }
      pieces.push({ text, rel });
      length += bytes(text).length;
    }
    // Copied branches go to the start of a copied instruction or far outside; jrcxz only inside.
    const code = bytes(pieces.map((p) => p.text).join(" "));
    const starts = pieces.map((_, i) =>
      pieces.slice(0, i).reduce((s, p) => s + bytes(p.text).length, 0)
    );
    const copied = starts.findIndex((s, i) => s + bytes(pieces[i].text).length >= minLength) + 1;
    const consumed = starts[copied - 1] + bytes(pieces[copied - 1].text).length;
    for (let i = 0; i < pieces.length; i++) {
      const rel = pieces[i].rel;
      if (rel === undefined) continue;
      const end = starts[i] + bytes(pieces[i].text).length;
      const loop = code[starts[i]] === 0xe3;
      let target = i < copied && (loop || random(2))
        ? starts[random(copied)]
        : consumed + random(100);
      if (i < copied && !loop && rel === 4 && random(2)) {
        target = random(2) ? 0x7000_0000 : -0x7000_0000;
      }
      if (i < copied) has.branch = true;
      const disp = target - end;
      if (rel === 1 && (disp < -128 || disp > 127)) {
        code.fill(0x90, starts[i], end);
        continue;
      }
      for (let b = 0; b < rel; b++) code[end - rel + b] = (disp >> (8 * b)) & 0xff;
    }
    for (const trampoline of trampolines(has)) {
      let out: Uint8Array;
      try {
        out = check(code, minLength, trampoline, copied);
      } catch (error) {
        // A widened copy can put a jrcxz out of its rel8 reach, and a call may be copied with
        // more after it; nothing else may fail.
        assert.ok(
          error instanceof RedefineError && /jrcxz cannot reach|a call returning/.test(error.message),
          String(error),
        );
        continue;
      }
      assert.ok(out.length >= consumed);
      trampolinesChecked++;
    }
  }
  log(`relocator: ${trampolinesChecked} random trampolines checked`);
  assert.ok(trampolinesChecked > 5000, `${trampolinesChecked}`);
});

test("relocator: the entries of libc, libm and libstdc++ relocate or are refused", () => {
  const refusals = new Map<string, number>();
  let relocated = 0;
  for (const name of ["libc.so.6", "libm.so.6", "libstdc++.so.6"]) {
    const seen = new Set<bigint>();
    for (const fn of elfFunctions(readFileSync(findLibrary(name)))) {
      if (seen.has(fn.address)) continue;
      seen.add(fn.address);
      for (const minLength of [5, 14]) {
        for (const [where, trampoline] of [["near", 0x10_0000n], ["far", 2n ** 40n]] as const) {
          try {
            const consumed = planRelocation(fn.bytes, fn.address, minLength).consumed;
            const copied = effects(fn.bytes.subarray(0, consumed), fn.address).length;
            check(fn.bytes, minLength, fn.address + trampoline, copied, fn.address);
            relocated++;
          } catch (error) {
            if (!(error instanceof RedefineError)) throw error;
            const reason = `${where} ${minLength}: ${error.code} ` + error.message
              .replace(/^the instruction at .*?\): /, "").replace(/, so the start .*/, "")
              .replace(/(\. Pass|: patch) .*/, "")
              .replace(/0x[0-9a-f]+/g, "X")
              .replace(/\d+ bytes/g, "N bytes");
            refusals.set(reason, (refusals.get(reason) ?? 0) + 1);
          }
        }
      }
    }
  }
  const refused = [...refusals].map(([reason, count]) => `${count}× ${reason}`).join("; ");
  log(`relocator: ${relocated} relocations of real entries checked; refused: ${refused}`);
  assert.ok(relocated > 20_000);
});

test("x86_64 arch: jumps, reach and landing pad", () => {
  assert.equal(x86_64.name, "x86_64");
  const [near, absolute] = x86_64.entryJumps;
  assert.deepEqual(x86_64.entryJumps.map((jump) => [jump.size, jump.reach]), [[5, 2n ** 31n - 5n], [14, 2n ** 62n]]);
  // The reach holds both ways from the jump's first byte.
  assert.ok(near.encode(AT, AT + near.reach) !== null);
  assert.ok(near.encode(AT, AT - near.reach) !== null);
  assert.equal(near.encode(AT, AT - near.reach - 1n), null);
  assert.deepEqual(near.encode(AT, AT + 0x10n), bytes("e9 0b 00 00 00"));
  assert.deepEqual(
    absolute!.encode(AT, 0x1122334455667788n),
    bytes("ff 25 00 00 00 00 88 77 66 55 44 33 22 11"),
  );
  assert.equal(x86_64.landingPadLength(bytes("f3 0f 1e fa 55")), 4);
  assert.equal(x86_64.landingPadLength(bytes("55 48 89 e5")), 0);
  assert.equal(x86_64.planRelocation, planRelocation);
  assert.equal(x86_64.relocate, relocate);
});
