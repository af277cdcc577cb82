import { assert, test } from "./harness.ts";
import { assertDisassembly, h } from "./objdump_aarch64.ts";
import {
  adr,
  adrp,
  assemble,
  b,
  B_REACH,
  bCond,
  bl,
  blr,
  br,
  cbz,
  JUMP_ABS_SIZE,
  JUMP_PAGE_REACH,
  JUMP_PAGE_SIZE,
  jumpAbs,
  jumpPage,
  ldrBase,
  ldrLiteral,
  type LiteralLoad,
  MOV_ABS_MAX_SIZE,
  movAbs,
  movk,
  movz,
  NOP,
  tbz,
} from "../src/arch/aarch64/writer.ts";
import { RedefineError } from "../src/errors.ts";

const AT = 0x7fff_0000_1000n;
const MiB = 1n << 20n;
const GiB = 1n << 30n;

/** Encoders that can fail return null; the cases below are all in reach. */
function words(...list: (number | null)[]): Uint8Array {
  return assemble(list.map((word) => {
    assert.notEqual(word, null, "in reach");
    return word!;
  }));
}

test("writer: assemble lays words and the literal out little-endian", () => {
  assert.deepEqual(
    Array.from(assemble([0x14000003, NOP], 0x0102_0304_0506_0708n)),
    [0x03, 0, 0, 0x14, 0x1f, 0x20, 0x03, 0xd5, 8, 7, 6, 5, 4, 3, 2, 1],
  );
});

test("writer: b and bl reach exactly -2^27 .. 2^27 - 4 bytes", () => {
  assert.equal(B_REACH, 2n ** 27n - 4n);
  assert.equal(b(AT, AT + B_REACH), 0x15ffffff);
  assert.equal(b(AT, AT - B_REACH - 4n), 0x16000000);
  assert.equal(b(AT, AT), 0x14000000);
  assert.equal(b(AT, AT + B_REACH + 4n), null);
  assert.equal(b(AT, AT - B_REACH - 8n), null);
  assert.equal(bl(AT, AT + B_REACH), 0x95ffffff);
  assert.equal(bl(AT, AT - B_REACH - 4n), 0x96000000);
  assert.equal(bl(AT, AT + B_REACH + 4n), null);
  assert.equal(bl(AT, AT - B_REACH - 8n), null);
  assertDisassembly(
    words(
      b(AT, AT + B_REACH),
      b(AT + 4n, AT - B_REACH),
      bl(AT + 8n, AT + 8n + B_REACH),
      bl(AT + 12n, AT - 0x40n),
    ),
    AT,
    [
      `b ${h(AT + B_REACH)}`,
      `b ${h(AT - B_REACH)}`,
      `bl ${h(AT + 8n + B_REACH)}`,
      `bl ${h(AT - 0x40n)}`,
    ],
  );
});

test("writer: misaligned branch ends are refused with INVALID_ADDRESS", () => {
  for (const [from, to] of [[AT + 2n, AT], [AT, AT + 6n]]) {
    assert.throws(() => b(from, to), (error: unknown) => {
      assert.ok(error instanceof RedefineError);
      assert.equal(error.code, "INVALID_ADDRESS");
      assert.match(error.message, /4-byte aligned/);
      assert.match(error.message, new RegExp(h(from)));
      return true;
    });
  }
});

const CONDITIONS = [
  "eq",
  "ne",
  "cs",
  "cc",
  "mi",
  "pl",
  "vs",
  "vc",
  "hi",
  "ls",
  "ge",
  "lt",
  "gt",
  "le",
  "al",
  "nv",
];

test("writer: b.cond and bc.cond for every condition", () => {
  const list = CONDITIONS.flatMap((_, cond) => [
    bCond(cond, false, AT + BigInt(cond) * 8n, AT + 0x100n),
    bCond(cond, true, AT + BigInt(cond) * 8n + 4n, AT - 0x100n),
  ]);
  assertDisassembly(
    words(...list),
    AT,
    CONDITIONS.flatMap((name) => [`b.${name} ${h(AT + 0x100n)}`, `bc.${name} ${h(AT - 0x100n)}`]),
  );
  assert.equal(bCond(1, false, AT, AT + 8n), 0x54000041);
});

test("writer: imm19 branches and loads reach exactly -1 MiB .. 1 MiB - 4", () => {
  const far = AT + MiB - 4n;
  const back = AT - MiB;
  const x3: { nonzero: boolean; sf: boolean; rt: number } = { nonzero: false, sf: true, rt: 3 };
  const cases: [string, (from: bigint, to: bigint) => number | null][] = [
    ["b.ne", (from, to) => bCond(1, false, from, to)],
    ["cbz x3,", (from, to) => cbz(x3, from, to)],
    ["ldr x3,", (from, to) => ldrLiteral("x", 3, from, to)],
  ];
  for (const [name, encode] of cases) {
    assert.equal(encode(AT, far + 4n), null, name);
    assert.equal(encode(AT, back - 4n), null, name);
    assertDisassembly(words(encode(AT, far), encode(AT + 4n, back + 4n)), AT, [
      `${name} ${h(far)}`,
      `${name} ${h(back + 4n)}`,
    ]);
  }
});

test("writer: cbz and cbnz on w and x registers", () => {
  assertDisassembly(
    words(
      cbz({ nonzero: false, sf: false, rt: 0 }, AT, AT + 8n),
      cbz({ nonzero: true, sf: false, rt: 7 }, AT + 4n, AT - 8n),
      cbz({ nonzero: false, sf: true, rt: 30 }, AT + 8n, AT + 0x1000n),
      cbz({ nonzero: true, sf: true, rt: 16 }, AT + 12n, AT),
    ),
    AT,
    [`cbz w0, ${h(AT + 8n)}`, `cbnz w7, ${h(AT - 8n)}`, `cbz x30, ${h(AT + 0x1000n)}`, `cbnz x16, ${h(AT)}`],
  );
  assert.equal(cbz({ nonzero: false, sf: true, rt: 0 }, AT, AT + 8n), 0xb4000040);
});

test("writer: tbz and tbnz on bits 0..63, reaching exactly -32 KiB .. 32 KiB - 4", () => {
  const reach = 32n * 1024n;
  assert.equal(tbz({ nonzero: false, bit: 0, rt: 0 }, AT, AT + reach), null);
  assert.equal(tbz({ nonzero: false, bit: 0, rt: 0 }, AT, AT - reach - 4n), null);
  assertDisassembly(
    words(
      tbz({ nonzero: false, bit: 0, rt: 1 }, AT, AT + reach - 4n),
      tbz({ nonzero: true, bit: 31, rt: 2 }, AT + 4n, AT + 4n - reach),
      tbz({ nonzero: false, bit: 32, rt: 3 }, AT + 8n, AT),
      tbz({ nonzero: true, bit: 63, rt: 4 }, AT + 12n, AT + 0x40n),
    ),
    AT,
    [
      `tbz w1, #0, ${h(AT + reach - 4n)}`,
      `tbnz w2, #31, ${h(AT + 4n - reach)}`,
      `tbz x3, #32, ${h(AT)}`,
      `tbnz x4, #63, ${h(AT + 0x40n)}`,
    ],
  );
});

test("writer: adr reaches bytes within -1 MiB .. 1 MiB - 1", () => {
  assert.equal(adr(0, AT, AT + MiB), null);
  assert.equal(adr(0, AT, AT - MiB - 1n), null);
  assertDisassembly(
    words(
      adr(0, AT, AT + MiB - 1n),
      adr(16, AT + 4n, AT + 4n - MiB),
      adr(30, AT + 8n, AT + 11n),
      adr(5, AT + 12n, AT + 11n),
    ),
    AT,
    [
      `adr x0, ${h(AT + MiB - 1n)}`,
      `adr x16, ${h(AT + 4n - MiB)}`,
      `adr x30, ${h(AT + 11n)}`,
      `adr x5, ${h(AT + 11n)}`,
    ],
  );
});

test("writer: adrp reaches pages within -4 GiB .. 4 GiB - 4 KiB", () => {
  const from = AT + 0x234n;
  const page = AT; // AT is page-aligned
  assert.equal(adrp(0, from, page + 4n * GiB), null);
  assert.equal(adrp(0, from, page - 4n * GiB - 1n), null);
  assertDisassembly(
    words(
      adrp(0, from, page + 4n * GiB - 1n),
      adrp(1, from, page - 4n * GiB),
      adrp(2, from, page + 0x5678n),
    ),
    from,
    [
      `adrp x0, ${h(page + 4n * GiB - 4096n)}`,
      `adrp x1, ${h(page - 4n * GiB)}`,
      `adrp x2, ${h(page + 0x5000n)}`,
    ],
  );
});

const LOADS: [LiteralLoad, string][] = [
  ["w", "ldr w3"],
  ["x", "ldr x3"],
  ["sw", "ldrsw x3"],
  ["prfm", "prfm pldl2strm"],
  ["s", "ldr s3"],
  ["d", "ldr d3"],
  ["q", "ldr q3"],
];

test("writer: ldr (literal) of every size, and prfm", () => {
  assertDisassembly(
    words(...LOADS.map(([load], i) => ldrLiteral(load, 3, AT + BigInt(i) * 4n, AT + 0x800n))),
    AT,
    LOADS.map(([, text]) => `${text}, ${h(AT + 0x800n)}`),
  );
});

test("writer: the same loads from [xn]", () => {
  assertDisassembly(
    words(...LOADS.map(([load]) => ldrBase(load, 3, 17))),
    AT,
    LOADS.map(([, text]) => `${text}, [x17]`),
  );
  assertDisassembly(words(ldrBase("x", 0, 0), ldrBase("w", 30, 30)), AT, ["ldr x0, [x0]", "ldr w30, [x30]"]);
});

test("writer: movz and movk", () => {
  assertDisassembly(
    words(movz(0, 0x1234, 0), movz(16, 0xffff, 3), movk(17, 0xbeef, 1), movk(1, 1, 2)),
    AT,
    [
      "mov x0, #0x1234",
      "mov x16, #0xffff000000000000",
      "movk x17, #0xbeef, lsl #16",
      "movk x1, #0x1, lsl #32",
    ],
  );
});

test("writer: movAbs skips zero halfwords and never exceeds four words", () => {
  const cases: [bigint, string[]][] = [
    [0n, ["mov x5, #0x0"]],
    [0x1234n, ["mov x5, #0x1234"]],
    [0x7fff_0000_1000n, ["mov x5, #0x1000", "movk x5, #0x7fff, lsl #32"]],
    [0x7f12_3456_789an, ["mov x5, #0x789a", "movk x5, #0x3456, lsl #16", "movk x5, #0x7f12, lsl #32"]],
    [0x1_0000_0000_0000n, ["mov x5, #0x1000000000000"]],
    [
      2n ** 64n - 1n,
      [
        "mov x5, #0xffff",
        "movk x5, #0xffff, lsl #16",
        "movk x5, #0xffff, lsl #32",
        "movk x5, #0xffff, lsl #48",
      ],
    ],
  ];
  for (const [value, listing] of cases) {
    const sequence = movAbs(5, value);
    assert.ok(sequence.length * 4 <= MOV_ABS_MAX_SIZE);
    assertDisassembly(assemble(sequence), AT, listing);
  }
});

test("writer: br, blr and nop", () => {
  assertDisassembly(assemble([br(16), blr(17), NOP]), AT, ["br x16", "blr x17", "nop"]);
});

test("writer: jumpAbs is ldr x16, #8; br x16; .quad", () => {
  const target = 0x1234_5678_9abc_def0n;
  const bytes = jumpAbs(target);
  assert.equal(bytes.length, JUMP_ABS_SIZE);
  assert.deepEqual(bytes.subarray(0, 8), assemble([ldrLiteral("x", 16, 0n, 8n)!, br(16)]));
  assertDisassembly(bytes, AT, [`ldr x16, ${h(AT + 8n)}`, "br x16", { quad: target }]);
});

test("writer: jumpPage is adrp x16; add x16, x16, #lo12; br x16, reaching JUMP_PAGE_REACH either way", () => {
  const listing = (to: bigint) => [`adrp x16, ${h(to - to % 4096n)}`, `add x16, x16, #${h(to % 4096n)}`, "br x16"];
  // From the start of a page, the middle and its last word: the reach is counted from the jump, the
  // encoding from its page.
  for (const from of [AT, AT + 0x7f8n, AT + 0xffcn]) {
    for (const to of [from + JUMP_PAGE_REACH, from - JUMP_PAGE_REACH, from + 0x1234n, from - 0xabcdn, from + 4n]) {
      const bytes = jumpPage(from, to)!;
      assert.equal(bytes.length, JUMP_PAGE_SIZE);
      assertDisassembly(bytes, from, listing(to));
    }
  }
  // The page boundaries, from the start of a page: 2^20 pages forward is out, 2^20 back is in.
  assertDisassembly(jumpPage(AT, AT + 4n * GiB - 4n)!, AT, listing(AT + 4n * GiB - 4n));
  assert.equal(jumpPage(AT, AT + 4n * GiB), null);
  assertDisassembly(jumpPage(AT, AT - 4n * GiB)!, AT, listing(AT - 4n * GiB));
  assert.equal(jumpPage(AT, AT - 4n * GiB - 4n), null);
  // Just past the reach from the last word of a page: the next page out, either way.
  assert.equal(jumpPage(AT + 0xffcn, AT - 4n * GiB - 4n), null);
  assert.equal(jumpPage(AT + 0xffcn, AT + 0xffcn + JUMP_PAGE_REACH + 4n), null);
});
