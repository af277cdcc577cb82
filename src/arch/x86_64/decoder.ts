/**
 * An x86-64 length decoder: for one instruction it finds the length and the operands that depend
 * on where the instruction sits (relative branches and RIP-relative memory), which is all the
 * relocator needs. It does not name instructions; it follows the opcode tables closely enough to
 * agree with a full disassembler on every encoding compilers emit.
 *
 * The scans over whole regions (is an entry jumped into, where does straight-line code end) call
 * `instructionLength` once an instruction: plain numbers, offsets into the bytes, no allocation.
 * Only `decode`, for the few instructions a relocation moves, makes objects and bigint addresses.
 */
import { hexBytes } from "../../errors.ts";
import { unrelocatable } from "../refusals.ts";

/** A relative branch: the only operand of `jmp`, `jcc`, `call`, `loop*`, `jrcxz` and `xbegin`. */
export interface Branch {
  kind: "jmp" | "jcc" | "call" | "loop" | "jrcxz" | "xbegin";
  /** Absolute address the branch goes to. */
  target: bigint;
  /** Byte offset of the displacement inside the instruction. */
  relOffset: number;
  /** Size of the displacement; 2 only for `xbegin` with an operand-size prefix. */
  relSize: 1 | 2 | 4;
  /** The condition nibble of a `jcc` (`0x4` for `je`); its lowest bit inverts the condition. */
  condition?: number;
}

/** Where control goes after an instruction: `jmp` is any unconditional transfer, indirect ones included. */
export type Flow = "normal" | "ret" | "jmp" | "int3" | "syscall" | "ud";

/** One decoded instruction. */
export interface Instruction {
  /** Run-time address of the first byte. */
  address: bigint;
  length: number;
  /** The instruction's bytes: a view of the decoded code (copy them to keep them past a change there). */
  bytes: Uint8Array;
  branch?: Branch;
  /** A memory operand addressed from the end of the instruction. */
  ripRelative?: { dispOffset: number; target: bigint };
  flow: Flow;
}

/**
 * What `instructionLength` found besides the length, written into an object the caller makes once
 * for a whole scan. Offsets count from the instruction's first byte; displacements are signed.
 */
export interface Operands {
  /** Size of a relative branch's displacement, 0 when there is none. */
  relSize: 0 | 1 | 2 | 4;
  relOffset: number;
  /** The branch displacement: the target is the instruction's end plus this. */
  rel: number;
  /** Offset of a RIP-relative memory operand's disp32, -1 when there is none. */
  ripDispOffset: number;
  ripDisp: number;
  /** A 67 prefix: RIP-relative addresses are computed in 32 bits. */
  address32: boolean;
  /** Opcode map (0 one-byte, 1 0F, 2 0F38, 3 0F3A; VEX/EVEX/XOP maps as encoded) and opcode. */
  map: number;
  opcode: number;
  /** The ModRM byte, -1 when there is none. */
  modrm: number;
  /** An F2 or F3 prefix. */
  repeat: boolean;
  /** A VEX, EVEX or XOP encoding. */
  escaped: boolean;
  /** After a failure: the bytes read before it, and the map named by a bad VEX/EVEX/XOP prefix. */
  consumed: number;
}

/** A fresh `Operands`, to pass to `instructionLength` for a whole scan. */
export function operands(): Operands {
  return {
    relSize: 0, relOffset: 0, rel: 0, ripDispOffset: -1, ripDisp: 0, address32: false,
    map: 0, opcode: 0, modrm: -1, repeat: false, escaped: false, consumed: 0,
  };
}

/*
 * Opcode tables, one character an opcode, 16 a row:
 *   .  no operand bytes          m  ModRM              b/w/z  imm8 / imm16 / imm16-or-32
 *   B  ModRM + imm8              Z  ModRM + imm16-or-32 v      imm16/32/64 (mov r, imm)
 *   g  ModRM + imm only for /0 /1 (test)               o      moffs (8 bytes, 4 with 67)
 *   e  imm16 + imm8 (enter)      j  rel8               J      rel32
 *   c  ModRM whose mod is ignored: always a register (mov to/from CR/DR)
 *   q  ModRM, + imm8 imm8 with a 66 or F2 prefix (extrq/insertq), else vmread
 *   p  prefix   X  escape to another map or to VEX/EVEX/XOP   x  invalid in 64-bit mode
 */
const ONE_BYTE_MAP = [
  "mmmmbzxxmmmmbzxX", // 00 add, push/pop es, or, push cs, 0f
  "mmmmbzxxmmmmbzxx", // 10 adc sbb
  "mmmmbzpxmmmmbzpx", // 20 and sub, daa das
  "mmmmbzpxmmmmbzpx", // 30 xor cmp, aaa aas
  "pppppppppppppppp", // 40 rex
  "................", // 50 push pop
  "xxXmppppzZbB....", // 60 pusha popa, evex, movsxd, fs gs 66 67, push imul, ins outs
  "jjjjjjjjjjjjjjjj", // 70 jcc rel8
  "BZxBmmmmmmmmmmmm", // 80 group 1, test xchg mov lea, pop (8F is XOP when the map says so)
  "..........x.....", // 90 xchg cwd, call far
  "oooo....bz......", // a0 mov moffs, string ops, test
  "bbbbbbbbvvvvvvvv", // b0 mov r, imm
  "BBw.XXBZe.w..bx.", // c0 shifts, ret, vex, mov imm, enter leave, retf, int, into, iret
  "mmmmxxx.mmmmmmmm", // d0 shifts, aam aad salc, xlat, x87
  "jjjjbbbbJJxj....", // e0 loop jrcxz, in out, call jmp, jmp far, jmp rel8, in out
  "p.pp..gg......mm", // f0 lock int1 rep, hlt cmc, group 3, flags, group 4 5
].join("");

const MAP_0F = [
  "mmmmx.....x.xm.B", // 00 groups, syscall, clts sysret invd wbinvd ud2, prefetch, femms, 3dnow
  "mmmmmmmmmmmmmmmm", // 10 sse moves, hint nops
  "ccccxxxxmmmmmmmm", // 20 mov cr/dr, sse
  "......x.XxXxxxxx", // 30 wrmsr rdtsc rdmsr rdpmc sysenter sysexit, getsec, 0f38 0f3a
  "mmmmmmmmmmmmmmmm", // 40 cmovcc
  "mmmmmmmmmmmmmmmm", // 50 sse
  "mmmmmmmmmmmmmmmm", // 60 mmx/sse
  "BBBBmmm.qmxxmmmm", // 70 pshuf, shift groups, emms, vmread/extrq, vmwrite
  "JJJJJJJJJJJJJJJJ", // 80 jcc rel32
  "mmmmmmmmmmmmmmmm", // 90 setcc
  "...mBmmm...mBmmm", // a0 push/pop fs, cpuid bt shld, padlock, push/pop gs, rsm bts shrd, group 15
  "mmmmmmmmmmBmmmmm", // b0 cmpxchg lss btr ..., popcnt ud1, group 8, bsf bsr movsx
  "mmBmBBBm........", // c0 xadd, cmpps, movnti, pinsrw pextrw shufps, group 9, bswap
  "mmmmmmmmmmmmmmmm", // d0
  "mmmmmmmmmmmmmmmm", // e0
  "mmmmmmmmmmmmmmmm", // f0 ... ud0
].join("");


/** Form codes of the table characters: the ones with a ModRM byte come first. */
const FORMS = ".mBZgcqbwzvoejJpXx";
const NONE = 0, MODRM = 1, MODRM_IMM8 = 2, MODRM_IMMZ = 3, MODRM_TEST = 4, MODRM_REG = 5, MODRM_EXTRQ = 6;
const IMM8 = 7, IMM16 = 8, IMMZ = 9, IMMV = 10, MOFFS = 11, ENTER = 12, REL8 = 13, REL32 = 14;
const INVALID_FIRST = 15; // p, X and x: a prefix, an escape or an invalid opcode where an opcode must be

function formTable(map: string): Uint8Array {
  // A loop, not `Uint8Array.from(map, ...)`: Bun's first call of that costs ~0.4 ms at import.
  const table = new Uint8Array(map.length);
  for (let i = 0; i < map.length; i++) table[i] = FORMS.indexOf(map[i]!);
  return table;
}
const ONE_BYTE = formTable(ONE_BYTE_MAP);
const TWO_BYTE = formTable(MAP_0F);

/** What each byte is as a prefix: 0 none, else one of the classes below. */
const PREFIX = new Uint8Array(256);
const REX = 1, OPERAND16 = 2, ADDRESS32 = 3, REPEAT = 4, LOCK = 5, SEGMENT = 6;
PREFIX.fill(REX, 0x40, 0x50);
PREFIX[0x66] = OPERAND16;
PREFIX[0x67] = ADDRESS32;
PREFIX[0xf2] = PREFIX[0xf3] = REPEAT;
PREFIX[0xf0] = LOCK;
for (const segment of [0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65]) PREFIX[segment] = SEGMENT;

/** VEX/EVEX map 1 opcodes with an imm8: the shuffles, shift groups, compares and inserts. */
const VEX_MAP1_IMM8 = new Uint8Array(256);
for (const opcode of [0x70, 0x71, 0x72, 0x73, 0xc2, 0xc4, 0xc5, 0xc6]) VEX_MAP1_IMM8[opcode] = 1;

/** The maps each escape may name, as bit sets. */
const VEX_MAPS = 0b1110, EVEX_MAPS = 0b110_1110, XOP_MAPS = 0b111_0000_0000;
const VEX = 1, EVEX = 2, XOP = 3;
const ESCAPE_NAMES = ["", "VEX", "EVEX", "XOP"];

const MAX_LENGTH = 15;

/**
 * Why bytes do not decode: `instructionLength` returns minus one of these. The reasons that name
 * a prefix or a map read it from the `Operands` of the failure.
 */
const TOO_LONG = 1, PAST_END = 2, NOT_64_BIT = 3, PREFIX_BEFORE_ESCAPE = 4, EVEX_BIT = 5, NO_SUCH_MAP = 6;

function reasonText(failure: number, found: Operands): string {
  const escape = ESCAPE_NAMES[found.opcode === 0x62 ? EVEX : found.opcode === 0x8f ? XOP : VEX];
  switch (failure) {
    case TOO_LONG:
      return "longer than the 15 bytes an instruction can have";
    case PAST_END:
      return "the instruction runs past the end of the function";
    case PREFIX_BEFORE_ESCAPE:
      return `a ${escape} prefix after a 66, F2, F3, F0 or REX prefix is invalid`;
    case EVEX_BIT:
      return "an EVEX prefix needs bit 2 of its third byte set";
    case NO_SUCH_MAP:
      return `opcode map ${found.map} does not exist for ${escape}`;
    default:
      return "not a valid instruction in 64-bit mode";
  }
}

/**
 * The length of the instruction at `code[offset]`, or a negative number when the bytes there are
 * not an instruction in 64-bit mode or `code` cuts it short. With `found`, also what it holds that
 * depends on its place (see `Operands`).
 *
 * @example
 * ```ts
 * import { instructionLength, operands } from "./decoder.ts";
 * const found = operands();
 * // jmp rel32 (+0x10): 5 bytes, the target 0x10 past its end
 * console.log(instructionLength(Uint8Array.of(0xe9, 0x10, 0, 0, 0), 0, found), found.rel); // 5 16
 * ```
 */
export function instructionLength(code: Uint8Array, offset: number, found: Operands | null = null): number {
  // Every byte read is checked against `limit`; at `limit` the instruction is too long or cut short.
  const limit = Math.min(code.length, offset + MAX_LENGTH);
  let p = offset;
  let operand16 = false, address32 = false, lock = false, repeat = 0, rex = 0;
  // F2/F3: the last one counts as the mandatory prefix; REX counts only right before the opcode.
  let byte = 0;
  for (;;) {
    if (p >= limit) return cutShort(offset, limit, found);
    byte = code[p++]!;
    const kind = PREFIX[byte];
    if (kind === 0) break;
    if (kind === REX) {
      rex = byte;
      continue;
    }
    if (kind === OPERAND16) operand16 = true;
    else if (kind === ADDRESS32) address32 = true;
    else if (kind === REPEAT) repeat = byte;
    else if (kind === LOCK) lock = true;
    rex = 0;
  }
  const rexW = (rex & 8) !== 0;

  let map = 0, escape = 0, opcode = byte;
  if (opcode === 0x0f) {
    if (p >= limit) return cutShort(offset, limit, found);
    opcode = code[p++]!;
    if (opcode === 0x38 || opcode === 0x3a) {
      map = opcode === 0x38 ? 2 : 3;
      if (p >= limit) return cutShort(offset, limit, found);
      opcode = code[p++]!;
    } else {
      map = 1;
    }
  } else if (opcode === 0xc4 || opcode === 0xc5 || opcode === 0x62) {
    escape = opcode === 0x62 ? EVEX : VEX;
  } else if (opcode === 0x8f && p < code.length && (code[p]! & 0x1f) >= 8) {
    // 8F is `pop r/m` unless the next byte's map field names an XOP map (8 and up).
    escape = XOP;
  }
  if (escape !== 0) {
    if (found !== null) found.opcode = opcode;
    if (operand16 || repeat !== 0 || lock || rex !== 0) return fail(PREFIX_BEFORE_ESCAPE, offset, p, found);
    if (p >= limit) return cutShort(offset, limit, found);
    const mapField = code[p++]! & (escape === EVEX ? 0x07 : 0x1f);
    // The byte after C5 holds no map field: 2-byte VEX always means map 1 (0F).
    map = opcode === 0xc5 ? 1 : mapField;
    if (escape === EVEX) {
      if (p >= limit) return cutShort(offset, limit, found);
      if ((code[p++]! & 0x04) === 0) return fail(EVEX_BIT, offset, p, found);
      if (p >= limit) return cutShort(offset, limit, found);
      p++;
    } else if (opcode !== 0xc5) {
      if (p >= limit) return cutShort(offset, limit, found);
      p++;
    }
    const maps = escape === VEX ? VEX_MAPS : escape === EVEX ? EVEX_MAPS : XOP_MAPS;
    if (((maps >> map) & 1) === 0) {
      if (found !== null) found.map = map;
      return fail(NO_SUCH_MAP, offset, p, found);
    }
    if (p >= limit) return cutShort(offset, limit, found);
    opcode = code[p++]!;
  }

  let form: number;
  if (escape === 0) {
    form = map === 0 ? ONE_BYTE[opcode]! : map === 1 ? TWO_BYTE[opcode]! : map === 2 ? MODRM : MODRM_IMM8;
  } else if (map === 1) {
    form = opcode === 0x77 && escape === VEX ? NONE : VEX_MAP1_IMM8[opcode] === 1 ? MODRM_IMM8 : MODRM;
  } else {
    form = map === 3 || map === 8 ? MODRM_IMM8 : map === 10 ? MODRM_IMMZ : MODRM;
  }
  if (form >= INVALID_FIRST) return fail(NOT_64_BIT, offset, p, found);

  let modrm = -1, ripDispOffset = -1, ripDisp = 0;
  if (form >= MODRM && form <= MODRM_EXTRQ) {
    if (p >= limit) return cutShort(offset, limit, found);
    modrm = code[p++]!;
    const mod = modrm >> 6;
    const rm = modrm & 7;
    if (form !== MODRM_REG && mod !== 3) {
      let sibBase = -1;
      if (rm === 4) {
        if (p >= limit) return cutShort(offset, limit, found);
        sibBase = code[p++]! & 7;
      }
      if (mod === 0 && rm === 5) {
        ripDispOffset = p - offset;
        if (p + 4 > limit) return cutShort(offset, limit, found);
        ripDisp = code[p]! | (code[p + 1]! << 8) | (code[p + 2]! << 16) | (code[p + 3]! << 24);
        p += 4;
      } else {
        p += mod === 1 ? 1 : mod === 2 || sibBase === 5 ? 4 : 0;
      }
    }
  }

  const immediate16or32 = operand16 && !rexW && escape === 0 ? 2 : 4;
  let relSize: 0 | 1 | 2 | 4 = 0;
  switch (form) {
    case MODRM_IMM8:
    case IMM8:
      p += 1;
      break;
    case IMM16:
      p += 2;
      break;
    case ENTER:
      p += 3;
      break;
    case IMMZ:
    case MODRM_IMMZ:
      if (opcode === 0xc7 && modrm === 0xf8 && map === 0) relSize = immediate16or32;
      else p += immediate16or32;
      break;
    case IMMV:
      p += rexW ? 8 : immediate16or32;
      break;
    case MOFFS:
      p += address32 ? 4 : 8;
      break;
    case MODRM_TEST:
      if (((modrm >> 3) & 7) < 2) p += opcode === 0xf6 ? 1 : immediate16or32;
      break;
    case MODRM_EXTRQ:
      if (operand16 || repeat === 0xf2) p += 2;
      break;
    case REL8:
      relSize = 1;
      break;
    case REL32:
      relSize = 4;
      break;
  }
  // The displacement and immediates are skipped whole: past `limit`, the last byte was missing.
  if (p + relSize > limit) return cutShort(offset, limit, found);

  if (found !== null) {
    found.relSize = relSize;
    found.relOffset = p - offset;
    found.rel = relSize === 1
      ? (code[p]! << 24) >> 24
      : relSize === 2
      ? ((code[p]! | (code[p + 1]! << 8)) << 16) >> 16
      : relSize === 4
      ? code[p]! | (code[p + 1]! << 8) | (code[p + 2]! << 16) | (code[p + 3]! << 24)
      : 0;
    found.ripDispOffset = ripDispOffset;
    found.ripDisp = ripDisp;
    found.address32 = address32;
    found.map = map;
    found.opcode = opcode;
    found.modrm = modrm;
    found.repeat = repeat !== 0;
    found.escaped = escape !== 0;
  }
  return p + relSize - offset;
}

/** The failure for an instruction that needs bytes past `limit`: all up to it were read. */
function cutShort(offset: number, limit: number, found: Operands | null): number {
  return fail(limit - offset >= MAX_LENGTH ? TOO_LONG : PAST_END, offset, limit, found);
}

function fail(reason: number, offset: number, p: number, found: Operands | null): number {
  if (found !== null) found.consumed = p - offset;
  return -reason;
}

/** Where control goes after the instruction `found` describes. */
export function flowOf(found: Operands): Flow {
  const { map, opcode, modrm } = found;
  if (found.escaped) return "normal";
  if (map === 1) {
    if (opcode === 0x05) return "syscall";
    // sysret, sysexit, rsm, skinit, and with F2/F3 erets eretu uiret: listed as returns so that
    // no caller takes them for code that falls through.
    if (opcode === 0x07 || opcode === 0x35 || opcode === 0xaa) return "ret";
    if (opcode === 0x01 && (modrm === 0xde || (found.repeat && (modrm === 0xca || modrm === 0xec)))) {
      return "ret";
    }
    return opcode === 0x0b || opcode === 0xb9 || opcode === 0xff ? "ud" : "normal";
  }
  if (map !== 0) return "normal";
  if (opcode === 0xc2 || opcode === 0xc3 || opcode === 0xca || opcode === 0xcb || opcode === 0xcf) return "ret";
  const reg = (modrm >> 3) & 7;
  if (opcode === 0xe9 || opcode === 0xeb || (opcode === 0xff && (reg === 4 || reg === 5))) return "jmp";
  return opcode === 0xcc ? "int3" : "normal";
}

function branchKind(map: number, opcode: number): Branch["kind"] {
  if (map === 1 || (opcode >= 0x70 && opcode <= 0x7f)) return "jcc";
  if (opcode === 0xe8) return "call";
  if (opcode === 0xe3) return "jrcxz";
  if (opcode >= 0xe0 && opcode <= 0xe2) return "loop";
  return opcode === 0xc7 ? "xbegin" : "jmp";
}

/**
 * Decodes the instruction at `code[offset]`, which runs at `address`. Throws `UNRELOCATABLE` for
 * bytes that are not an instruction in 64-bit mode or that `code` cuts short.
 *
 * @example
 * ```ts
 * import { decode } from "./decoder.ts";
 * // jmp rel32 (+0x10) at 0x1000: 5 bytes, to 0x1015
 * const insn = decode(Uint8Array.of(0xe9, 0x10, 0, 0, 0), 0, 0x1000n);
 * console.log(insn.length, insn.branch?.target); // 5 4117n
 * ```
 */
export function decode(code: Uint8Array, offset: number, address: bigint): Instruction {
  const found = operands();
  const length = instructionLength(code, offset, found);
  if (length < 0) {
    const bytes = code.subarray(offset, offset + found.consumed);
    throw unrelocatable(address, hexBytes(bytes), reasonText(-length, found));
  }
  const instruction: Instruction = {
    address,
    length,
    bytes: code.subarray(offset, offset + length),
    flow: flowOf(found),
  };
  if (found.relSize !== 0) {
    const kind = branchKind(found.map, found.opcode);
    instruction.branch = {
      kind,
      target: BigInt.asUintN(64, address + BigInt(length + found.rel)),
      relOffset: found.relOffset,
      relSize: found.relSize,
    };
    if (kind === "jcc") instruction.branch.condition = found.opcode & 0x0f;
  }
  if (found.ripDispOffset >= 0) {
    // With a 67 prefix the CPU computes the address in 32 bits.
    const target = BigInt.asUintN(found.address32 ? 32 : 64, address + BigInt(length + found.ripDisp));
    instruction.ripRelative = { dispOffset: found.ripDispOffset, target };
  }
  return instruction;
}
