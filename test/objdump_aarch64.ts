/**
 * The reference disassembler for the aarch64 tests: Capstone (compiled to WebAssembly, a pinned
 * devDependency, so `npm install` is all it needs), its text rewritten into GNU objdump's syntax,
 * in which the tests write their listings. Capstone and objdump decode alike but print differently
 * (`b #0x1000` / `b 0x1000`, `#16` / `#0x10`, `b.hs` / `b.cs`); the rewriting changes notation only,
 * never a value, and test/objdump_aarch64.test.ts checks it against objdump itself where installed.
 * A word Capstone does not decode prints as objdump's `.inst 0x… ; undefined`.
 */
import { assert } from "./harness.ts";

/** A 64-bit literal expected in the listing instead of the two words objdump would make of it. */
export interface Quad {
  quad: bigint;
}

interface Instruction {
  mnemonic: string;
  op_str: string;
}
interface Capstone {
  ARCH_ARM64: number;
  MODE_ARM: number;
  Capstone: new (arch: number, mode: number) => { disasm(bytes: number[], address: bigint): Instruction[] };
}
// A CommonJS package without types: loaded by a computed specifier so neither checker wants them.
const capstone: Capstone = await (await import("@alexaltea/capstone-js" as string)).default();
const aarch64 = new capstone.Capstone(capstone.ARCH_ARM64, capstone.MODE_ARM);

/** The ones whose last operand is an address (objdump prints it bare, in hex). */
const PC_RELATIVE = /^(b|bl|b\.\w+|bc\.\w+|cbz|cbnz|tbz|tbnz|adr|adrp|ldr|ldrsw|prfm)$/;
/** The ones whose first immediate objdump prints in hex (a following shift amount stays decimal). */
const HEX_FIRST = /^(mov|movz|movn|movk|add|adds|sub|subs|cmp|cmn|and|ands|orr|eor|tst)$/;
/** The ones whose every immediate objdump prints in hex. */
const HEX_ALL = /^(ccmp|ccmn|addg|subg|brk|svc|hvc|smc|hlt|hint|dcps\d)$/;
/** The ones ending in a condition: Capstone says `hs`/`lo`, objdump `cs`/`cc`. */
const CONDITIONAL = /^(csel|csinc|csinv|csneg|cset|csetm|cinc|cinv|cneg|ccmp|ccmn|fcsel|fccmp|fccmpe)$/;

function parse(text: string): bigint {
  return text.startsWith("-") ? -BigInt(text.slice(1)) : BigInt(text);
}

function hex(value: bigint): string {
  return value < 0n ? "-0x" + (-value).toString(16) : "0x" + value.toString(16);
}

/** objdump's text for the one `word` at `address`, comments dropped, whitespace collapsed. */
function objdumpText(word: number, address: bigint): string {
  let decoded: Instruction | undefined;
  try {
    decoded = aarch64.disasm([word & 0xff, (word >>> 8) & 0xff, (word >>> 16) & 0xff, word >>> 24], address)[0];
  } catch {
    // Capstone throws on a word it cannot decode.
  }
  if (!decoded) return `.inst 0x${word.toString(16).padStart(8, "0")} ; undefined`;
  const mnemonic = decoded.mnemonic.replace(/^(b|bc)\.hs$/, "$1.cs").replace(/^(b|bc)\.lo$/, "$1.cc");
  let operands = decoded.op_str;
  if (PC_RELATIVE.test(mnemonic)) operands = operands.replace(/#(-?(?:0x)?[0-9a-f]+)$/, (_, n) => hex(parse(n)));
  if (mnemonic === "sys" || mnemonic === "sysl") operands = operands.replace(/\bc(\d+)\b/g, "C$1");
  if (CONDITIONAL.test(mnemonic)) operands = operands.replace(/\bhs$/, "cs").replace(/\blo$/, "cc");
  operands = operands.replace(/\{v\d+(\.\w+)(?:, v\d+\1){2,}\}/g, registerRange);
  operands = operands.replace(/\[(0x[0-9a-f]+)\]/g, (_, n) => `[${BigInt(n)}]`);
  // A post-index offset, which Capstone prints unsigned: objdump prints it signed, in decimal.
  operands = operands.replace(/\], #?((?:0x)?[0-9a-f]+)$/, (_, n) => `], #${BigInt.asIntN(64, BigInt(n))}`);
  const bits = operands.startsWith("w") ? 32n : 64n;
  let first = true;
  operands = operands.replace(/(, (?:lsl|lsr|asr|ror|msl|[us]xt[bhwx]) )?#(-?(?:0x)?[0-9a-f]+)\b/g, (_, shift, n) => {
    const value = parse(n);
    if (shift) return `${shift}#${value}`;
    const isFirst = first;
    first = false;
    // mov of a negative value (movn): objdump prints the register's unsigned value.
    if (HEX_FIRST.test(mnemonic) && isFirst) return "#" + hex(value < 0n ? value + (1n << bits) : value);
    return "#" + (HEX_ALL.test(mnemonic) ? hex(value) : value.toString());
  });
  // An unallocated prefetch operation, which Capstone prints as nothing: objdump's #0xNN.
  if (mnemonic.startsWith("prf")) operands = operands.replace(/^,/, `#0x${(word & 31).toString(16).padStart(2, "0")},`);
  return aliasAsObjdump(word, `${mnemonic} ${operands}`.trim());
}

/** Three or four consecutive vector registers as objdump writes them: {v1.d-v3.d}, unless they wrap past v31. */
function registerRange(list: string): string {
  const registers = list.slice(1, -1).split(", ");
  const numbers = registers.map((r) => Number(/^v(\d+)/.exec(r)![1]));
  if (numbers.some((n, i) => i > 0 && n !== numbers[i - 1]! + 1)) return list;
  return `{${registers[0]}-${registers[registers.length - 1]}}`;
}

/** Where Capstone prefers an alias objdump does not (the architecture's rule is objdump's). */
function aliasAsObjdump(word: number, text: string): string {
  // `mov` for `orr rd, zr, #imm` only when no movz or movn makes the value.
  const orr = /^mov ([wx])(\d+|zr|sp), #(0x[0-9a-f]+)$/.exec(text);
  if (orr && (word & 0x7f800000) === 0x32000000) {
    const bits = orr[1] === "w" ? 32 : 64;
    const value = BigInt(orr[3]!);
    const oneHalfword = (v: bigint) =>
      Array.from({ length: bits / 16 }, (_, i) => (v >> BigInt(16 * i)) & 0xffffn).filter((h) => h !== 0n).length <= 1;
    if (oneHalfword(value) || oneHalfword(BigInt.asUintN(bits, ~value))) return `orr ${orr[1]}${orr[2]}, ${orr[1]}zr, #${orr[3]}`;
  }
  // `bfc` only when the field is inserted (imms < immr); otherwise it is `bfxil` from the zero register.
  const bfc = /^bfc ([wx])(\d+|zr), #(\d+), #(\d+)$/.exec(text);
  if (bfc && ((word >>> 10) & 63) >= ((word >>> 16) & 63)) return `bfxil ${bfc[1]}${bfc[2]}, ${bfc[1]}zr, #${bfc[3]}, #${bfc[4]}`;
  return text;
}

/**
 * objdump's text for each word of `bytes` placed at `address`: "mnemonic operands", with
 * whitespace collapsed and its `//` comments dropped (branch targets are absolute addresses).
 */
export function disassemble(bytes: Uint8Array, address: bigint): string[] {
  assert.equal(bytes.length % 4, 0, "whole words");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const lines: string[] = [];
  for (let offset = 0; offset < bytes.length; offset += 4) {
    lines.push(objdumpText(view.getUint32(offset, true), address + BigInt(offset)));
  }
  return lines;
}

/**
 * Asserts that `bytes` placed at `address` disassemble to `expected`, one entry per word, with
 * `{ quad }` standing for an 8-byte little-endian literal.
 */
export function assertDisassembly(
  bytes: Uint8Array,
  address: bigint,
  expected: readonly (string | Quad)[],
): void {
  const listing = disassemble(bytes, address);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const actual: string[] = [];
  for (let word = 0; word < listing.length; word++) {
    if (typeof expected[actual.length] === "object") {
      actual.push(`.quad 0x${view.getBigUint64(word * 4, true).toString(16)}`);
      word++;
    } else {
      actual.push(listing[word]!);
    }
  }
  const wanted = expected.map((line) =>
    typeof line === "string" ? line : `.quad 0x${line.quad.toString(16)}`
  );
  assert.deepEqual(actual, wanted);
}

/** `0x` and lowercase hex, as objdump prints addresses and immediates. */
export function h(value: bigint | number): string {
  return "0x" + value.toString(16);
}
