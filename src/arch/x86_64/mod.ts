/**
 * The x86-64 instruction set for `redefine` (placeholder by the lead until the relocator lands:
 * helper-1 replaces planRelocation/relocate with the real relocator).
 */
import { RedefineError } from "../../errors.ts";
import type { Arch } from "../mod.ts";
import { JMP_ABS_SIZE, JMP_REL32_SIZE, jmpAbs, jmpRel32, startsWithEndbr64 } from "./writer.ts";

/** x86-64. */
export const x86_64: Arch = {
  name: "x86_64",
  nearReach: 2n ** 31n - 1n - BigInt(JMP_REL32_SIZE),
  nearJumpSize: JMP_REL32_SIZE,
  farJumpSize: JMP_ABS_SIZE,
  codeAlignment: 1,
  landingPadLength: (code) => (startsWithEndbr64(code) ? 4 : 0),
  nearJump: jmpRel32,
  farJump: (_from, to) => jmpAbs(to),
  planRelocation() {
    throw new RedefineError("UNRELOCATABLE", "not yet");
  },
  relocate() {
    throw new RedefineError("UNRELOCATABLE", "not yet");
  },
};
