/**
 * An x86-64 length decoder: for one instruction it finds the length and the operands that depend
 * on where the instruction sits (relative branches and RIP-relative memory), which is all the
 * relocator needs. It does not name instructions; it follows the opcode tables closely enough to
 * agree with a full disassembler on every encoding compilers emit.
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

/** One decoded instruction. */
export interface Instruction {
  /** Run-time address of the first byte. */
  address: bigint;
  length: number;
  /** A copy of the instruction's bytes. */
  bytes: Uint8Array;
  branch?: Branch;
  /** A memory operand addressed from the end of the instruction. */
  ripRelative?: { dispOffset: number; target: bigint };
  /** Where control goes after it: `jmp` is any unconditional transfer, indirect ones included. */
  flow: "normal" | "ret" | "jmp" | "int3" | "syscall" | "ud";
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

/** VEX/EVEX map 1 opcodes with an imm8: the shuffles, shift groups, compares and inserts. */
const VEX_MAP1_IMM8 = new Set([0x70, 0x71, 0x72, 0x73, 0xc2, 0xc4, 0xc5, 0xc6]);

const SEGMENT_PREFIXES = new Set([0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65]);
const MAX_LENGTH = 15;

/** How an encoding that starts with C4, C5, 62 or 8F names its opcode map. */
type Escape = "vex" | "evex" | "xop";

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
  let p = offset;
  const fail = (reason: string): never => {
    throw unrelocatable(address, hexBytes(code.subarray(offset, p)), reason);
  };
  const next = (): number => {
    if (p - offset >= MAX_LENGTH) fail("longer than the 15 bytes an instruction can have");
    if (p >= code.length) fail("the instruction runs past the end of the function");
    return code[p++];
  };
  const skip = (size: number): void => {
    for (let i = 0; i < size; i++) next();
  };
  const nextLE = (size: number): number => {
    let value = 0;
    for (let i = 0; i < size; i++) value += next() * 2 ** (8 * i);
    return value >= 2 ** (8 * size - 1) ? value - 2 ** (8 * size) : value;
  };

  let operand16 = false;
  let address32 = false;
  let lock = false;
  // F2/F3: the last one counts as the mandatory prefix; REX counts only right before the opcode.
  let repeat = 0;
  let rex = 0;
  let byte = next();
  for (;; byte = next()) {
    if (byte >= 0x40 && byte <= 0x4f) {
      rex = byte;
      continue;
    }
    if (byte === 0x66) operand16 = true;
    else if (byte === 0x67) address32 = true;
    else if (byte === 0xf2 || byte === 0xf3) repeat = byte;
    else if (byte === 0xf0) lock = true;
    else if (!SEGMENT_PREFIXES.has(byte)) break;
    rex = 0;
  }
  const rexW = (rex & 8) !== 0;

  let map = 0;
  let escape: Escape | undefined;
  let opcode = byte;
  if (opcode === 0x0f) {
    opcode = next();
    if (opcode === 0x38 || opcode === 0x3a) {
      map = opcode === 0x38 ? 2 : 3;
      opcode = next();
    } else {
      map = 1;
    }
  } else if (opcode === 0xc4 || opcode === 0xc5 || opcode === 0x62 || opcode === 0x8f) {
    escape = opcode === 0x62 ? "evex" : opcode === 0x8f ? "xop" : "vex";
    if (escape === "xop") {
      // 8F is `pop r/m` unless the next byte's map field names an XOP map (8 and up).
      if (p >= code.length || (code[p] & 0x1f) < 8) escape = undefined;
    }
    if (escape !== undefined) {
      if (operand16 || repeat !== 0 || lock || rex !== 0) {
        fail(`a ${escape.toUpperCase()} prefix after a 66, F2, F3, F0 or REX prefix is invalid`);
      }
      const mapField = next() & (escape === "evex" ? 0x07 : 0x1f);
      // The byte after C5 holds no map field: 2-byte VEX always means map 1 (0F).
      map = opcode === 0xc5 ? 1 : mapField;
      if (escape === "evex") {
        if ((next() & 0x04) === 0) fail("an EVEX prefix needs bit 2 of its third byte set");
        next();
      } else if (opcode !== 0xc5) {
        next();
      }
      const maps = escape === "vex" ? [1, 2, 3] : escape === "evex" ? [1, 2, 3, 5, 6] : [8, 9, 10];
      if (!maps.includes(map)) fail(`opcode map ${map} does not exist for ${escape.toUpperCase()}`);
      opcode = next();
    }
  }

  let form: string;
  if (escape === undefined) {
    form = map === 0 ? ONE_BYTE_MAP[opcode] : map === 1 ? MAP_0F[opcode] : map === 2 ? "m" : "B";
  } else if (map === 1) {
    form = opcode === 0x77 && escape === "vex" ? "." : VEX_MAP1_IMM8.has(opcode) ? "B" : "m";
  } else {
    form = map === 3 || map === 8 ? "B" : map === 10 ? "Z" : "m";
  }
  if (form === "x" || form === "p" || form === "X") fail("not a valid instruction in 64-bit mode");

  let modrm = -1;
  let ripDispOffset = -1;
  let ripDisp = 0;
  if ("mBZgcq".includes(form)) {
    modrm = next();
    const mod = modrm >> 6;
    const rm = modrm & 7;
    if (form !== "c" && mod !== 3) {
      const sibBase = rm === 4 ? next() & 7 : -1;
      if (mod === 0 && rm === 5) {
        ripDispOffset = p - offset;
        ripDisp = nextLE(4);
      } else {
        skip(mod === 1 ? 1 : mod === 2 || sibBase === 5 ? 4 : 0);
      }
    }
  }

  const immediate16or32 = operand16 && !rexW && escape === undefined ? 2 : 4;
  const reg = (modrm >> 3) & 7;
  let relSize: 0 | 1 | 2 | 4 = 0;
  switch (form) {
    case "b":
    case "B":
      skip(1);
      break;
    case "w":
      skip(2);
      break;
    case "e":
      skip(3);
      break;
    case "z":
    case "Z":
      if (opcode === 0xc7 && modrm === 0xf8 && map === 0) relSize = immediate16or32;
      else skip(immediate16or32);
      break;
    case "v":
      skip(rexW ? 8 : immediate16or32);
      break;
    case "o":
      skip(address32 ? 4 : 8);
      break;
    case "g":
      if (reg < 2) skip(opcode === 0xf6 ? 1 : immediate16or32);
      break;
    case "q":
      if (operand16 || repeat === 0xf2) skip(2);
      break;
    case "j":
      relSize = 1;
      break;
    case "J":
      relSize = 4;
      break;
  }

  let branch: Branch | undefined;
  if (relSize !== 0) {
    const relOffset = p - offset;
    const rel = nextLE(relSize);
    const kind = branchKind(map, opcode);
    branch = {
      kind,
      target: BigInt.asUintN(64, address + BigInt(p - offset + rel)),
      relOffset,
      relSize,
    };
    if (kind === "jcc") branch.condition = opcode & 0x0f;
  }

  const length = p - offset;
  const instruction: Instruction = {
    address,
    length,
    bytes: code.slice(offset, p),
    flow: escape === undefined ? flowOf(map, opcode, modrm, repeat !== 0) : "normal",
  };
  if (branch !== undefined) instruction.branch = branch;
  if (ripDispOffset >= 0) {
    // With a 67 prefix the CPU computes the address in 32 bits.
    const target = BigInt.asUintN(address32 ? 32 : 64, address + BigInt(length + ripDisp));
    instruction.ripRelative = { dispOffset: ripDispOffset, target };
  }
  return instruction;
}

function branchKind(map: number, opcode: number): Branch["kind"] {
  if (map === 1 || (opcode >= 0x70 && opcode <= 0x7f)) return "jcc";
  if (opcode === 0xe8) return "call";
  if (opcode === 0xe3) return "jrcxz";
  if (opcode >= 0xe0 && opcode <= 0xe2) return "loop";
  return opcode === 0xc7 ? "xbegin" : "jmp";
}

function flowOf(map: number, opcode: number, modrm: number, repeat: boolean): Instruction["flow"] {
  if (map === 1) {
    if (opcode === 0x05) return "syscall";
    // sysret, sysexit, rsm, skinit, and with F2/F3 erets eretu uiret: listed as returns so that
    // no caller takes them for code that falls through.
    if ([0x07, 0x35, 0xaa].includes(opcode)) return "ret";
    if (opcode === 0x01 && (modrm === 0xde || (repeat && (modrm === 0xca || modrm === 0xec)))) {
      return "ret";
    }
    return opcode === 0x0b || opcode === 0xb9 || opcode === 0xff ? "ud" : "normal";
  }
  if (map !== 0) return "normal";
  if ([0xc2, 0xc3, 0xca, 0xcb, 0xcf].includes(opcode)) return "ret";
  const reg = (modrm >> 3) & 7;
  if (opcode === 0xe9 || opcode === 0xeb || (opcode === 0xff && (reg === 4 || reg === 5))) {
    return "jmp";
  }
  return opcode === 0xcc ? "int3" : "normal";
}
