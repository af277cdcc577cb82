/**
 * The x86-64 instruction set for `redefine`: entry jumps from `writer.ts`, prologue relocation
 * from `relocator.ts`.
 */
import { ANYWHERE, type Arch } from "../types.ts";
import { planRelocation, relocate } from "./relocator.ts";
import { flowOf, instructionLength, operands } from "./decoder.ts";
import { branchesBetween, mayBranchInto } from "./scan.ts";
import { guardData, guardLayout, guardStub, returnAddressReader, threadPointerReader } from "./guard.ts";
import { registryLock } from "./registry_lock.ts";
import { cannedCode } from "./canned.ts";
import { probe } from "./probe.ts";
import {
  ENDBR64,
  JMP_ABS_SIZE,
  JMP_INDIRECT_SIZE,
  JMP_REL32_SIZE,
  jmpAbs,
  jmpIndirect,
  jmpRel32,
  startsWithEndbr64,
} from "./writer.ts";

/**
 * x86-64: a 5-byte `jmp rel32` when the target is within reach, else a 14-byte
 * `jmp qword [rip+0]`; `endbr64` stays at the entry of functions built for CET.
 *
 * @example
 * ```ts
 * import { x86_64 } from "./mod.ts";
 * console.log(x86_64.entryJumps[0].encode(0x1000n, 0x2000n)); // Uint8Array(5) [ 233, 251, 15, 0, 0 ]
 * console.log(x86_64.landingPadLength(Uint8Array.of(0xf3, 0x0f, 0x1e, 0xfa))); // 4
 * ```
 */
export const x86_64: Arch = {
  name: "x86_64",
  entryJumps: [
    // rel32 counts from the end of the 5-byte jump, so from its start it reaches 2^31 + 4 bytes
    // forward but only 2^31 - 5 back: the symmetric reach is the smaller.
    { size: JMP_REL32_SIZE, reach: 2n ** 31n - BigInt(JMP_REL32_SIZE), encode: jmpRel32 },
    { size: JMP_ABS_SIZE, reach: ANYWHERE, encode: (_from, to) => jmpAbs(to) },
  ],
  selfLoop: Uint8Array.of(0xeb, 0xfe), // jmp $
  landingPadLength: (code) => (startsWithEndbr64(code) ? ENDBR64.length : 0),
  planRelocation,
  relocate,
  straightLineLength(code, _address) {
    const found = operands();
    let offset = 0;
    while (offset < code.length) {
      const length = instructionLength(code, offset, found);
      if (length < 0) break;
      offset += length;
      const flow = flowOf(found);
      if (flow !== "normal" && flow !== "syscall") break;
    }
    return offset;
  },
  branchesInto(code, address, from, to) {
    // Almost every scan finds nothing: first look for byte patterns that could be a relative
    // branch into the range, and decode only when one is there.
    if (!mayBranchInto(code, address, from, to)) return [];
    return branchesBetween(code, address, from, to, false);
  },
  startsInstruction(code, _address, offset) {
    let at = 0;
    while (at < offset) {
      const length = instructionLength(code, at);
      if (length < 0) return null;
      at += length;
    }
    return at === offset;
  },
  indirectJumpSize: JMP_INDIRECT_SIZE,
  indirectJump: jmpIndirect,
  registryLock,
  canned: cannedCode,
  guard: { layout: guardLayout, threadPointerReader, returnAddressReader, encode: guardStub, data: guardData },
  probe,
};

