import { assert, test } from "./harness.ts";
import { assertDisassembly, disassemble, h, type Quad } from "./objdump_aarch64.ts";
import { aarch64 } from "../src/arch/aarch64/mod.ts";
import { decode, decodeAt } from "../src/arch/aarch64/decoder.ts";
import { planRelocation, relocate } from "../src/arch/aarch64/relocator.ts";
import {
  adr,
  adrp,
  assemble,
  b,
  bCond,
  bl,
  cbz,
  ldrLiteral,
  type LiteralLoad,
  NOP,
  tbz,
} from "../src/arch/aarch64/writer.ts";
import { RedefineError } from "../src/errors.ts";
import { isArm64, words } from "./native.ts";
import { runRelocated } from "./live_trampoline.ts";

/** The patched function. Its halfwords 0x7f00, 0x1234, 0 show in the movz/movk sequences. */
const A = 0x7f00_1234_0000n;
/** Trampolines: every form re-targets from NEAR; only b, bl and adrp reach from MID; nothing from FAR. */
const NEAR = A + 0x4000n;
const MID = A + 0x100_0000n;
const FAR = A + 0x2_0000_0000n;
const FAR_BELOW = A - 0x2_0000_0000n;

const STP = 0xa9bf7bfd; //   stp x29, x30, [sp, #-16]!
const MOV_FP = 0x910003fd; // mov x29, sp
const ADD = 0x91004021; //   add x1, x1, #0x10
const RET = 0xd65f03c0; //   ret

/** Words that must all be encodable in the test's layout. */
function code(...words: (number | null)[]): Uint8Array {
  return assemble(words.map((word) => {
    assert.notEqual(word, null, "test input in reach");
    return word!;
  }));
}

/** The listing objdump gives for movAbs of `value` into `reg`. */
function movs(reg: string, value: bigint): string[] {
  const lines: string[] = [];
  for (let hw = 0; hw < 4; hw++) {
    const half = (value >> BigInt(16 * hw)) & 0xffffn;
    if (half === 0n) continue;
    lines.push(
      lines.length === 0
        ? `mov ${reg}, ${h(half << BigInt(16 * hw))}`
        : `movk ${reg}, ${h(half)}, lsl #${16 * hw}`,
    );
  }
  return lines.length === 0 ? [`mov ${reg}, #0x0`] : lines.map((line) => line.replace(", 0x", ", #0x"));
}

/** The jump back from `at` to `to`, as relocate writes it. */
function back(at: bigint, to: bigint): (string | Quad)[] {
  return b(at, to) === null ? [`ldr x16, ${h(at + 8n)}`, "br x16", { quad: to }] : [`b ${h(to)}`];
}

/**
 * Relocates `bytes` (at A) to `trampoline` and checks the listing, that the plan and the output
 * agree, and that the output fits the plan's bound.
 */
function expectRelocation(
  bytes: Uint8Array,
  minLength: number,
  trampoline: bigint,
  listing: (string | Quad)[],
  consumed = Math.ceil(minLength / 4) * 4,
): Uint8Array {
  const plan = planRelocation(bytes, A, minLength);
  assert.equal(plan.consumed, consumed);
  const out = relocate(plan, trampoline);
  assert.ok(out.length <= plan.maxSize, `${out.length} bytes fit the bound ${plan.maxSize}`);
  assertDisassembly(out, trampoline, listing);
  return out;
}

function assertRefused(bytes: Uint8Array, minLength: number, code: string, ...patterns: RegExp[]): void {
  for (
    const attempt of [() => planRelocation(bytes, A, minLength), () => relocate(planRelocation(bytes, A, minLength), NEAR)]
  ) {
    assert.throws(attempt, (error: unknown) => {
      assert.ok(error instanceof RedefineError);
      assert.equal(error.code, code);
      for (const pattern of patterns) assert.match(error.message, pattern);
      return true;
    });
  }
}

// ---- decoder -------------------------------------------------------------------------------

/** A small deterministic generator (mulberry32), so failures reproduce. */
function random(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) >>> 0;
    let t = seed;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

const LITERAL_WORDS: [LiteralLoad, number][] = [
  ["w", 0x18000000],
  ["x", 0x58000000],
  ["sw", 0x98000000],
  ["prfm", 0xd8000000],
  ["s", 0x1c000000],
  ["d", 0x5c000000],
  ["q", 0x9c000000],
];

/** Random words of each PC-relative class: opcode bits fixed, every operand field random. */
const CLASSES: [string, (r: number) => number][] = [
  ["adr", (r) => (r & 0x60ffffff) | 0x10000000],
  ["adrp", (r) => (r & 0x60ffffff) | 0x90000000],
  ["ldrLiteral", (r) => LITERAL_WORDS[r % 7][1] | (r & 0x00ffffe0) | (r >>> 27)],
  ["b", (r) => (r & 0x03ffffff) | 0x14000000],
  ["bl", (r) => (r & 0x03ffffff) | 0x94000000],
  ["bCond", (r) => (r & 0x00ffffff) | 0x54000000],
  ["cbz", (r) => (r & 0x81ffffff) | 0x34000000],
  ["tbz", (r) => (r & 0x81ffffff) | 0x36000000],
];

test("decode: targets of every PC-relative class agree with objdump", () => {
  const next = random(1);
  for (const [kind, make] of CLASSES) {
    const words = Array.from({ length: 200 }, () => make(next()) >>> 0);
    const listing = disassemble(assemble(words), A);
    words.forEach((word, i) => {
      const instruction = decode(word, A + BigInt(i * 4));
      assert.equal(instruction.kind, kind, listing[i]);
      assert.ok("target" in instruction);
      assert.ok(
        listing[i].endsWith(" " + h(instruction.target)),
        `${listing[i]} targets ${h(instruction.target)}`,
      );
    });
  }
});

test("decode: the writer re-encodes every decoded PC-relative word to itself", () => {
  const next = random(2);
  for (const [, make] of CLASSES) {
    for (let i = 0; i < 500; i++) {
      const word = make(next()) >>> 0;
      const at = A + BigInt(i * 4);
      const instruction = decode(word, at);
      const again = (() => {
        switch (instruction.kind) {
          case "adr":
            return adr(instruction.rd, at, instruction.target);
          case "adrp":
            return adrp(instruction.rd, at, instruction.target);
          case "ldrLiteral":
            return ldrLiteral(instruction.load, instruction.rt, at, instruction.target);
          case "b":
            return b(at, instruction.target);
          case "bl":
            return bl(at, instruction.target);
          case "bCond":
            return bCond(instruction.cond, instruction.consistent, at, instruction.target);
          case "cbz":
            return cbz(instruction.branch, at, instruction.target);
          case "tbz":
            return tbz(instruction.branch, at, instruction.target);
          default:
            throw new Error(`unexpected ${instruction.kind}`);
        }
      })();
      assert.equal(again, word, `0x${word.toString(16)}`);
    }
  }
});

test("decode: ldr (literal) variants carry their load kind and register", () => {
  for (const [load, opcode] of LITERAL_WORDS) {
    const instruction = decode((opcode | (2 << 5) | 7) >>> 0, A);
    assert.deepEqual(instruction, {
      word: (opcode | 0x47) >>> 0,
      address: A,
      kind: "ldrLiteral",
      load,
      rt: 7,
      target: A + 8n,
    });
  }
  // opc 11 with V set is unallocated: nothing to relocate.
  assert.equal(decode(0xdc000040, A).kind, "normal");
});

test("decode: landing pads are named as objdump names them", () => {
  const pads = [0xd503241f, 0xd503245f, 0xd503249f, 0xd50324df, 0xd503233f, 0xd503237f];
  const listing = disassemble(assemble(pads), A);
  pads.forEach((word, i) => {
    const instruction = decode(word, A);
    assert.equal(instruction.kind, "landingPad");
    assert.equal(instruction.kind === "landingPad" && instruction.pad, listing[i]);
  });
});

test("decode: ret, br and udf, and position-independent words", () => {
  const words = [RET, 0xd65f0060, 0xd61f0200, 0x00000000, 0x0000abcd];
  assertDisassembly(assemble(words), A, ["ret", "ret x3", "br x16", "udf #0", "udf #43981"]);
  assert.deepEqual(words.map((word) => decode(word, A)), [
    { word: RET, address: A, kind: "ret", rn: 30 },
    { word: 0xd65f0060, address: A, kind: "ret", rn: 3 },
    { word: 0xd61f0200, address: A, kind: "br", rn: 16 },
    { word: 0, address: A, kind: "udf", imm16: 0 },
    { word: 0xabcd, address: A, kind: "udf", imm16: 0xabcd },
  ]);
  const normal = [
    STP,
    MOV_FP,
    ADD,
    NOP,
    0xd63f0200,
    0xd65f0bff,
    0xd50323bf,
    0xf9400000,
    0xd503201f + (0x60 << 5),
  ];
  assertDisassembly(assemble(normal), A, [
    "stp x29, x30, [sp, #-16]!",
    "mov x29, sp",
    "add x1, x1, #0x10",
    "nop",
    "blr x16",
    "retaa",
    "autiasp",
    "ldr x0, [x0]",
    "hint #0x60",
  ]);
  for (const word of normal) assert.equal(decode(word, A).kind, "normal", `0x${word.toString(16)}`);
});

test("decode: FEAT_CMPBR compare-and-branch is recognised with its target", () => {
  // cbbge w5, w3, #-1024, encoded as LLVM's cmpbr tests show; binutils 2.40 predates it.
  const instruction = decode(0x7423a005, A);
  assert.equal(instruction.kind, "cmpbr");
  assert.equal("target" in instruction && instruction.target, A - 1024n);
  assert.equal(decodeAt(assemble([NOP, 0x7423a005]), 4, A).kind, "cmpbr");
});

// ---- relocation of each class --------------------------------------------------------------

test("relocate: position-independent words are copied, then a jump back", () => {
  const fn = code(STP, MOV_FP, 0xf9400000, RET);
  expectRelocation(fn, 8, NEAR, ["stp x29, x30, [sp, #-16]!", "mov x29, sp", `b ${h(A + 8n)}`]);
  expectRelocation(fn, 5, MID, ["stp x29, x30, [sp, #-16]!", "mov x29, sp", `b ${h(A + 8n)}`]);
  expectRelocation(fn, 16, FAR, [
    "stp x29, x30, [sp, #-16]!",
    "mov x29, sp",
    "ldr x0, [x0]",
    "ret",
    `ldr x16, ${h(FAR + 24n)}`,
    "br x16",
    { quad: A + 16n },
  ]);
  expectRelocation(fn, 4, A + 4n + 2n ** 27n, [
    "stp x29, x30, [sp, #-16]!",
    ...back(A + 8n + 2n ** 27n, A + 4n),
  ]);
  expectRelocation(fn, 4, A + 4n - 2n ** 27n, ["stp x29, x30, [sp, #-16]!", `b ${h(A + 4n)}`]);
});

test("relocate: adr re-targets when in reach, else materialises the address", () => {
  const target = A + 0x1235n;
  const fn = code(adr(3, A, target), NOP);
  assertDisassembly(fn.subarray(0, 4), A, [`adr x3, ${h(target)}`]);
  expectRelocation(fn, 4, NEAR, [`adr x3, ${h(target)}`, `b ${h(A + 4n)}`]);
  expectRelocation(fn, 4, MID, [
    "mov x3, #0x1235",
    "movk x3, #0x1234, lsl #16",
    "movk x3, #0x7f00, lsl #32",
    `b ${h(A + 4n)}`,
  ]);
});

test("relocate: adrp re-targets within 4 GiB, else materialises the page", () => {
  const page = A + 0x5_0000n;
  const fn = code(adrp(0, A, page), NOP);
  assertDisassembly(fn.subarray(0, 4), A, [`adrp x0, ${h(page)}`]);
  expectRelocation(fn, 4, MID, [`adrp x0, ${h(page)}`, `b ${h(A + 4n)}`]);
  expectRelocation(fn, 4, FAR, [
    "mov x0, #0x12390000",
    "movk x0, #0x7f00, lsl #32",
    ...back(FAR + 8n, A + 4n),
  ]);
  expectRelocation(fn, 4, FAR_BELOW, [...movs("x0", page), ...back(FAR_BELOW + 8n, A + 4n)]);
});

const LOADS: [LiteralLoad, string, string][] = [
  ["w", "ldr w3", "x3"],
  ["x", "ldr x3", "x3"],
  ["sw", "ldrsw x3", "x3"],
  ["prfm", "prfm pldl2strm", "x17"],
  ["s", "ldr s3", "x17"],
  ["d", "ldr d3", "x17"],
  ["q", "ldr q3", "x17"],
];

test("relocate: ldr (literal) of every size loads through its own register or x17", () => {
  const pool = A + 0x800n;
  const fn = code(...LOADS.map(([load], i) => ldrLiteral(load, 3, A + BigInt(i * 4), pool)));
  assertDisassembly(fn, A, LOADS.map(([, text]) => `${text}, ${h(pool)}`));
  expectRelocation(fn, fn.length, NEAR, [
    ...LOADS.map(([, text]) => `${text}, ${h(pool)}`),
    `b ${h(A + 28n)}`,
  ]);
  expectRelocation(fn, fn.length, MID, [
    ...LOADS.flatMap(([, text, base]) => [...movs(base, pool), `${text}, [${base}]`]),
    `b ${h(A + 28n)}`,
  ]);
});

test("relocate: a literal load into the zero register uses x17 as its base", () => {
  const pool = A + 0x800n;
  const fn = code(ldrLiteral("x", 31, A, pool), ldrLiteral("w", 31, A + 4n, pool));
  assertDisassembly(fn, A, [`ldr xzr, ${h(pool)}`, `ldr wzr, ${h(pool)}`]);
  expectRelocation(fn, 8, FAR, [
    ...movs("x17", pool),
    "ldr xzr, [x17]",
    ...movs("x17", pool),
    "ldr wzr, [x17]",
    ...back(FAR + 32n, A + 8n),
  ]);
});

test("relocate: b re-targets when in reach, else jumps through x16", () => {
  const target = A + 0x40_0000n;
  const fn = code(b(A, target), NOP);
  expectRelocation(fn, 4, MID, [`b ${h(target)}`, `b ${h(A + 4n)}`]);
  expectRelocation(fn, 4, FAR, [
    `ldr x16, ${h(FAR + 8n)}`,
    "br x16",
    { quad: target },
    `ldr x16, ${h(FAR + 24n)}`,
    "br x16",
    { quad: A + 4n },
  ]);
});

test("relocate: bl, the last moved word, puts the original return address in x30, then jumps", () => {
  const target = A - 0x40_0000n;
  const fn = code(bl(A, target), NOP);
  expectRelocation(fn, 4, MID, [...movs("x30", A + 4n), `b ${h(target)}`]);
  const link = movs("x30", A + 4n);
  expectRelocation(fn, 4, FAR, [
    ...link,
    `ldr x16, ${h(FAR + BigInt(4 * link.length + 8))}`,
    "br x16",
    { quad: target },
  ]);
  // mov x17, x30; bl +4; mov x0, x30; ret x17 (Frida's call +0; pop shape): x0 gets A + 8.
  const getPc = code(0xaa1e03f1, bl(A + 4n, A + 8n), 0xaa1e03e0, 0xd65f0220);
  expectRelocation(getPc, 8, NEAR, ["mov x17, x30", ...movs("x30", A + 8n), `b ${h(A + 8n)}`]);
  // A bl with more moved words after it would return into the overwritten ones.
  assertRefused(
    code(bl(A, target), NOP, RET),
    8,
    "UNRELOCATABLE",
    /\(0x97f00000, bl\)/,
    /it is a call returning to 0x7f0012340004, inside the 8 bytes the patch overwrites at 0x7f0012340000/,
  );
  // push-and-call shape: stp; bl, moved together by a 16-byte patch only when bl is last.
  expectRelocation(code(STP, MOV_FP, NOP, bl(A + 12n, target), RET), 16, MID, [
    "stp x29, x30, [sp, #-16]!",
    "mov x29, sp",
    "nop",
    ...movs("x30", A + 16n),
    `b ${h(target)}`,
  ]);
});

if (isArm64) {
  test("relocate: a relocated bl that reads its return address gets the original's, run live", () => {
    const getPc = runRelocated(aarch64, [
      ...words(
        0xaa1e03f1, // mov x17, x30: the caller's return address
        0x94000001, // bl +4
        0xaa1e03e0, // mov x0, x30: the address after the bl
        0xd65f0220, // ret x17
      ),
    ], 8);
    assert.equal(getPc.result, getPc.address + 8n);
  });
}

test("relocate: b.cond re-targets, else its inverse steps over b, else over an absolute jump", () => {
  const target = A + 0x8_0000n;
  const fn = code(bCond(1, false, A, target), bCond(0xc, true, A + 4n, target));
  assertDisassembly(fn, A, [`b.ne ${h(target)}`, `bc.gt ${h(target)}`]);
  expectRelocation(fn, 8, NEAR, [`b.ne ${h(target)}`, `bc.gt ${h(target)}`, `b ${h(A + 8n)}`]);
  expectRelocation(fn, 8, MID, [
    `b.eq ${h(MID + 8n)}`,
    `b ${h(target)}`,
    `bc.le ${h(MID + 16n)}`,
    `b ${h(target)}`,
    `b ${h(A + 8n)}`,
  ]);
  expectRelocation(fn, 8, FAR, [
    `b.eq ${h(FAR + 20n)}`,
    `ldr x16, ${h(FAR + 12n)}`,
    "br x16",
    { quad: target },
    `bc.le ${h(FAR + 40n)}`,
    `ldr x16, ${h(FAR + 32n)}`,
    "br x16",
    { quad: target },
    ...back(FAR + 40n, A + 8n),
  ]);
});

test("relocate: b.al and b.nv always branch, so they become plain jumps", () => {
  const target = A + 0x8_0000n;
  const fn = code(bCond(14, false, A, target), bCond(15, false, A + 4n, target));
  expectRelocation(fn, 8, NEAR, [`b.al ${h(target)}`, `b.nv ${h(target)}`, `b ${h(A + 8n)}`]);
  expectRelocation(fn, 8, MID, [`b ${h(target)}`, `b ${h(target)}`, `b ${h(A + 8n)}`]);
  expectRelocation(fn, 8, FAR, [
    `ldr x16, ${h(FAR + 8n)}`,
    "br x16",
    { quad: target },
    `ldr x16, ${h(FAR + 24n)}`,
    "br x16",
    { quad: target },
    ...back(FAR + 32n, A + 8n),
  ]);
});

test("relocate: cbz and cbnz flip to each other over the longer jump", () => {
  const target = A - 0x100n;
  const fn = code(
    cbz({ nonzero: false, sf: true, rt: 2 }, A, target),
    cbz({ nonzero: true, sf: false, rt: 9 }, A + 4n, target),
  );
  expectRelocation(fn, 8, NEAR, [`cbz x2, ${h(target)}`, `cbnz w9, ${h(target)}`, `b ${h(A + 8n)}`]);
  expectRelocation(fn, 8, MID, [
    `cbnz x2, ${h(MID + 8n)}`,
    `b ${h(target)}`,
    `cbz w9, ${h(MID + 16n)}`,
    `b ${h(target)}`,
    `b ${h(A + 8n)}`,
  ]);
  expectRelocation(fn, 8, FAR_BELOW, [
    `cbnz x2, ${h(FAR_BELOW + 20n)}`,
    `ldr x16, ${h(FAR_BELOW + 12n)}`,
    "br x16",
    { quad: target },
    `cbz w9, ${h(FAR_BELOW + 40n)}`,
    `ldr x16, ${h(FAR_BELOW + 32n)}`,
    "br x16",
    { quad: target },
    ...back(FAR_BELOW + 40n, A + 8n),
  ]);
});

test("relocate: tbz and tbnz flip to each other over the longer jump", () => {
  const target = A + 0x100n;
  const fn = code(
    tbz({ nonzero: false, bit: 3, rt: 5 }, A, target),
    tbz({ nonzero: true, bit: 40, rt: 6 }, A + 4n, target),
  );
  expectRelocation(fn, 8, NEAR, [`tbz w5, #3, ${h(target)}`, `tbnz x6, #40, ${h(target)}`, `b ${h(A + 8n)}`]);
  expectRelocation(fn, 8, MID, [
    `tbnz w5, #3, ${h(MID + 8n)}`,
    `b ${h(target)}`,
    `tbz x6, #40, ${h(MID + 16n)}`,
    `b ${h(target)}`,
    `b ${h(A + 8n)}`,
  ]);
  expectRelocation(fn, 8, FAR, [
    `tbnz w5, #3, ${h(FAR + 20n)}`,
    `ldr x16, ${h(FAR + 12n)}`,
    "br x16",
    { quad: target },
    `tbz x6, #40, ${h(FAR + 40n)}`,
    `ldr x16, ${h(FAR + 32n)}`,
    "br x16",
    { quad: target },
    ...back(FAR + 40n, A + 8n),
  ]);
});

test("relocate: branches into the moved words stay inside the trampoline", () => {
  const page = A + 0x5000n;
  const fn = code(
    cbz({ nonzero: false, sf: true, rt: 0 }, A, A + 12n), // forward, over the adrp that grows
    adrp(1, A + 4n, page),
    ADD,
    bCond(1, false, A + 12n, A), // back to the first word
    cbz({ nonzero: true, sf: true, rt: 0 }, A + 16n, A + 20n), // just past the moved words: original code
    RET,
  );
  expectRelocation(fn, 20, FAR, [
    `cbz x0, ${h(FAR + 20n)}`,
    "mov x1, #0x5000",
    "movk x1, #0x1234, lsl #16",
    "movk x1, #0x7f00, lsl #32",
    "add x1, x1, #0x10",
    `b.ne ${h(FAR)}`,
    `cbz x0, ${h(FAR + 44n)}`,
    `ldr x16, ${h(FAR + 36n)}`,
    "br x16",
    { quad: A + 20n },
    ...back(FAR + 44n, A + 20n),
  ]);
});

test("relocate: a 12-byte plan (the ±4 GiB entry jump) moves three words of any class", () => {
  // libc's labs, whole: the trampoline returns from its copy; the jump back is never reached.
  const labs = code(0xf100001f, 0xda805400, RET); // cmp x0, #0; cneg x0, x0, mi; ret
  expectRelocation(labs, 12, MID, ["cmp x0, #0x0", "cneg x0, x0, mi", "ret", `b ${h(A + 12n)}`]);
  const loads = code(
    adrp(0, A, A + 0x5_0000n),
    ldrLiteral("x", 1, A + 4n, A + 0x8000n),
    cbz({ nonzero: false, sf: true, rt: 2 }, A + 8n, A + 0x2000n),
    RET,
  );
  expectRelocation(loads, 12, MID, [
    `adrp x0, ${h(A + 0x5_0000n)}`,
    ...movs("x1", A + 0x8000n),
    "ldr x1, [x1]",
    `cbnz x2, ${h(MID + 0x1cn)}`,
    `b ${h(A + 0x2000n)}`,
    `b ${h(A + 12n)}`,
  ]);
  const call = code(
    adr(3, A, A + 0x1235n),
    tbz({ nonzero: true, bit: 3, rt: 5 }, A + 4n, A + 0x100n),
    bl(A + 8n, A + 0x30_0000n),
    RET,
  );
  expectRelocation(call, 12, FAR, [
    ...movs("x3", A + 0x1235n),
    `tbz w5, #3, ${h(FAR + 0x20n)}`,
    `ldr x16, ${h(FAR + 0x18n)}`,
    "br x16",
    { quad: A + 0x100n },
    ...movs("x30", A + 12n),
    `ldr x16, ${h(FAR + 0x34n)}`,
    "br x16",
    { quad: A + 0x30_0000n },
  ]);
  // A branch back into the third word forbids the 12-byte jump, not the 4-byte one.
  const into = code(STP, MOV_FP, NOP, NOP, b(A + 16n, A + 8n), RET);
  assertRefused(into, 12, "UNRELOCATABLE", /0x7f0012340010/, /inside the 12 bytes/);
  expectRelocation(into, 4, NEAR, ["stp x29, x30, [sp, #-16]!", `b ${h(A + 4n)}`]);
  const toEnd = code(STP, MOV_FP, NOP, NOP, b(A + 16n, A + 12n), RET);
  expectRelocation(toEnd, 12, MID, ["stp x29, x30, [sp, #-16]!", "mov x29, sp", "nop", `b ${h(A + 12n)}`]);
});

test("relocate: a leading landing pad is copied like any hint", () => {
  const fn = code(0xd503233f, STP, MOV_FP, RET);
  assert.equal(aarch64.landingPadLength(fn), 4);
  expectRelocation(fn, 8, NEAR, ["paciasp", "stp x29, x30, [sp, #-16]!", `b ${h(A + 8n)}`]);
});

// ---- refusals ------------------------------------------------------------------------------

test("refuse: a later branch into the overwritten words, unless it targets their start", () => {
  const into = code(STP, MOV_FP, NOP, NOP, cbz({ nonzero: true, sf: true, rt: 0 }, A + 16n, A + 4n), RET);
  assertRefused(
    into,
    16,
    "UNRELOCATABLE",
    /0x7f0012340000/,
    /0x7f0012340010/,
    /0xb5ffffa0/,
    /inside the 16 bytes/,
  );
  expectRelocation(into, 4, NEAR, ["stp x29, x30, [sp, #-16]!", `b ${h(A + 4n)}`]);
  const toStart = code(STP, MOV_FP, NOP, NOP, b(A + 16n, A), RET);
  expectRelocation(toStart, 16, NEAR, [
    "stp x29, x30, [sp, #-16]!",
    "mov x29, sp",
    "nop",
    "nop",
    `b ${h(A + 16n)}`,
  ]);
  const toEnd = code(STP, MOV_FP, NOP, NOP, bl(A + 16n, A + 16n), RET);
  expectRelocation(toEnd, 16, NEAR, [
    "stp x29, x30, [sp, #-16]!",
    "mov x29, sp",
    "nop",
    "nop",
    `b ${h(A + 16n)}`,
  ]);
});

test("refuse: literal loads of the overwritten words, from anywhere", () => {
  assertRefused(
    code(ldrLiteral("x", 0, A, A + 8n), NOP, NOP, RET),
    12,
    "UNRELOCATABLE",
    /reads data at 0x7f0012340008/,
  );
  assertRefused(code(NOP, NOP, ldrLiteral("q", 0, A + 8n, A - 12n), RET), 8, "UNRELOCATABLE", /reads data/);
  // Eight bytes ending where the patch starts are untouched, and prfm reads nothing.
  const fine = code(NOP, NOP, ldrLiteral("x", 0, A + 8n, A - 8n), ldrLiteral("prfm", 0, A + 12n, A));
  expectRelocation(fine, 8, NEAR, ["nop", "nop", `b ${h(A + 8n)}`]);
});

test("refuse: adr of an address inside the overwritten words", () => {
  assertRefused(
    code(NOP, adr(1, A + 4n, A + 4n), RET),
    8,
    "UNRELOCATABLE",
    /takes the address 0x7f0012340004/,
  );
  assertRefused(code(NOP, NOP, adr(1, A + 8n, A + 2n)), 4, "UNRELOCATABLE", /adr/);
  expectRelocation(code(adr(1, A, A), NOP), 4, NEAR, [`adr x1, ${h(A)}`, `b ${h(A + 4n)}`]);
});

test("refuse: FEAT_CMPBR among the moved words, or aiming into them", () => {
  assertRefused(code(NOP, 0x7423a005, RET), 8, "UNRELOCATABLE", /FEAT_CMPBR/, /0x7423a005/);
  // cbbge at A+0x400 jumping back 1024 bytes: to A, allowed; one word further is inside.
  const far = new Uint8Array(0x404);
  far.set(code(NOP, NOP), 0);
  new DataView(far.buffer).setUint32(0x400, 0x7423a005, true);
  expectRelocation(far, 8, NEAR, ["nop", "nop", `b ${h(A + 8n)}`]);
  const inside = new Uint8Array(0x408);
  inside.set(code(NOP, NOP), 0);
  new DataView(inside.buffer).setUint32(0x404, 0x7423a005, true);
  assertRefused(inside, 8, "UNRELOCATABLE", /jumps to 0x7f0012340004/);
});

test("refuse: too short a function, and a misaligned address", () => {
  assertRefused(code(0x52800020, RET), 16, "FUNCTION_TOO_SHORT", /0x7f0012340000/, /has 8 bytes/, /needs 16/);
  assert.throws(() => planRelocation(code(NOP, NOP), A + 2n, 4), (error: unknown) => {
    assert.ok(error instanceof RedefineError);
    assert.equal(error.code, "INVALID_ADDRESS");
    return true;
  });
});

// ---- the size bound ------------------------------------------------------------------------

test("maxSize: every class at its longest reaches the bound exactly", () => {
  // All four halfwords of the targets are non-zero, so each movz/movk sequence is four words.
  const base = 0x1234_5678_9abc_0000n;
  const far = base + 0x3_0000_0000n;
  const at = (i: number) => base + BigInt(i * 4);
  const fn = code(
    adr(0, at(0), base + 0x8_0010n),
    adrp(1, at(1), base + 0x8_1000n), // page offset non-zero in its low halfword
    ldrLiteral("d", 2, at(2), base + 0x8_0020n),
    b(at(3), base + 0x8_0000n),
    bCond(0, false, at(4), base + 0x8_0000n),
    cbz({ nonzero: false, sf: true, rt: 3 }, at(5), base + 0x8_0000n),
    tbz({ nonzero: false, bit: 1, rt: 4 }, at(6), base + 0x7000n),
    STP,
    cbz({ nonzero: false, sf: true, rt: 3 }, at(8), base),
    bl(at(9), base + 0x8_0000n), // last, so no jump back: the callee returns to the original
  );
  const plan = planRelocation(fn, base, fn.length);
  assert.equal(plan.maxSize, 16 + 16 + 20 + 16 + 20 + 20 + 20 + 4 + 4 + 32);
  assert.equal(relocate(plan, far).length, plan.maxSize);
});

test("maxSize: bounds random prologues wherever the trampoline lands", () => {
  const next = random(3);
  const trampolines = [NEAR, A - 0x4000n, MID, A - 0x100_0000n, A + 0x7ff_0000n, FAR, FAR_BELOW, 0x1000n];
  let relocated = 0;
  for (let round = 0; round < 300; round++) {
    const words = Array.from({ length: 8 }, () => {
      const r = next();
      return r % 3 === 0 ? STP : CLASSES[r % CLASSES.length][1](next()) >>> 0;
    });
    const fn = assemble(words);
    const minLength = 4 + (next() % 5) * 4;
    let plan;
    try {
      plan = planRelocation(fn, A, minLength);
    } catch (error) {
      assert.ok(error instanceof RedefineError && error.code === "UNRELOCATABLE", String(error));
      continue;
    }
    for (const trampoline of trampolines) {
      const out = relocate(plan, trampoline);
      assert.ok(out.length <= plan.maxSize, `${out.length} <= ${plan.maxSize}`);
      assert.equal(out.length % 4, 0);
      relocated++;
    }
  }
  assert.ok(relocated > 1500, `${relocated} relocations ran`);
});

// ---- the Arch object -----------------------------------------------------------------------

test("aarch64: entry jumps, sizes and landing pads", () => {
  assert.equal(aarch64.name, "aarch64");
  const [near, page, absolute] = aarch64.entryJumps;
  assert.deepEqual(
    aarch64.entryJumps.map((jump) => [jump.size, jump.reach]),
    [[4, 2n ** 27n - 4n], [12, 2n ** 32n - 4096n], [16, 2n ** 62n]],
  );
  assertDisassembly(near.encode(A, A + near.reach)!, A, [`b ${h(A + near.reach)}`]);
  assertDisassembly(near.encode(A, A - near.reach)!, A, [`b ${h(A - near.reach)}`]);
  assert.equal(near.encode(A, A + near.reach + 4n), null);
  assert.equal(near.encode(A, A - near.reach - 8n), null);
  // From the last word of a page, the page jump's reach holds both ways to the word.
  const last = A + 0xffcn;
  for (const to of [last + page!.reach, last - page!.reach, last + near.reach + 4n]) {
    const listing = [`adrp x16, ${h(to - to % 4096n)}`, `add x16, x16, #${h(to % 4096n)}`, "br x16"];
    assertDisassembly(page!.encode(last, to)!, last, listing);
  }
  assert.equal(page!.encode(last, last + page!.reach + 4n), null);
  assertDisassembly(absolute!.encode(A, FAR)!, A, [`ldr x16, ${h(A + 8n)}`, "br x16", { quad: FAR }]);
  for (const pad of [0xd503241f, 0xd503245f, 0xd503249f, 0xd50324df, 0xd503233f, 0xd503237f]) {
    assert.equal(aarch64.landingPadLength(code(pad, NOP)), 4, `0x${pad.toString(16)}`);
  }
  for (const other of [NOP, STP, 0xd50323bf, 0xd503201f + (33 << 5)]) {
    assert.equal(aarch64.landingPadLength(code(other, NOP)), 0, `0x${other.toString(16)}`);
  }
  assert.equal(aarch64.landingPadLength(new Uint8Array(0)), 0);
  assert.equal(aarch64.landingPadLength(code(0xd503245f).subarray(0, 3)), 0);
});
