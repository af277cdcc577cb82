/**
 * Moves the first instructions of an x86-64 function into a trampoline so that the entry can be
 * overwritten with a jump while the original stays callable: whole instructions are copied,
 * everything addressed relative to the instruction pointer is rewritten for the new place, and a
 * jump back to the rest of the function closes the copy. A call may only end the copy: the callee
 * gets the original return address and returns to the rest itself. No form used here touches a
 * register or the flags beyond what the original instruction did.
 */
import { concat } from "../bytes.ts";
import type { RelocationPlan } from "../types.ts";
import { type Branch, decode, type Instruction } from "./decoder.ts";
import { tooShort, unrelocatable } from "../refusals.ts";
import { branchesBetween, mayBranchInto } from "./scan.ts";
import { hex, hexBytes, type RedefineError } from "../../errors.ts";
import { i32le, JMP_ABS_SIZE, JMP_REL32_SIZE, jmpAbs, PUSH_ADDRESS_SIZE, pushAddress, putI32, putJmpRel32, rel32 } from "./writer.ts";

/** The bytes a copied branch takes: `near` with a rel32 operand, `far` with an absolute address. */
const FORMS = {
  jmp: { near: 5, far: JMP_ABS_SIZE }, // jmp rel32 | jmp qword [rip+0]; dq target
  jcc: { near: 6, far: 2 + JMP_ABS_SIZE }, // jcc rel32 | j!cc +14; jmp qword [rip+0]; dq target
  // push the original return address; then jmp rel32 | jmp qword [rip+0]; dq target
  call: { near: PUSH_ADDRESS_SIZE + 5, far: PUSH_ADDRESS_SIZE + JMP_ABS_SIZE },
};

/**
 * How many bytes from `address` must move to free `minLength` bytes, decoded once, and the
 * largest trampoline `relocate` can make of them. Throws `UNRELOCATABLE` for code that cannot
 * move and `FUNCTION_TOO_SHORT` when `code` (the function's extent) is shorter than `minLength`.
 *
 * @example
 * ```ts
 * import { planRelocation } from "./relocator.ts";
 * // push rbp; mov rbp, rsp; sub rsp, 0x10; ret
 * const code = Uint8Array.of(0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10, 0xc3);
 * const plan = planRelocation(code, 0x1000n, 5);
 * console.log(plan.consumed, plan.maxSize, plan.instructions.length); // 8 22 3
 * ```
 */
export function planRelocation(
  code: Uint8Array,
  address: bigint,
  minLength: number,
): RelocationPlan<Instruction> {
  const instructions = copiedInstructions(code, address, minLength);
  const consumed = instructions.reduce((sum, insn) => sum + insn.length, 0);
  // The plan keeps its own copy of the bytes it moves (one array, not one an instruction), so it
  // stays true of them whatever is written at `address` later.
  const moved = new Uint8Array(consumed);
  moved.set(code.subarray(0, consumed));
  let offset = 0;
  for (const insn of instructions) insn.bytes = moved.subarray(offset, offset += insn.length);
  const worst = layout(instructions, address, consumed, null);
  const jumpBack = endsInCall(instructions) ? 0 : JMP_ABS_SIZE;
  return { address, consumed, maxSize: worst[instructions.length]! + jumpBack, instructions };
}

/**
 * The trampoline placed at `trampoline` for the instructions of `plan`: the copy, rewritten to
 * run there, and a jump back to the first instruction left in place (unless a call ends it).
 *
 * @example
 * ```ts
 * import { planRelocation, relocate } from "./relocator.ts";
 * // mov rax, [rip+0x100]; ret — the load keeps reading 0x1107 from the trampoline at 0x2000
 * const code = Uint8Array.of(0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00, 0xc3);
 * const out = relocate(planRelocation(code, 0x1000n, 5), 0x2000n);
 * console.log(out.slice(0, 7)); // Uint8Array(7) [ 72, 139, 5, 0, 241, 255, 255 ]
 * ```
 */
export function relocate(plan: RelocationPlan<Instruction>, trampoline: bigint): Uint8Array {
  const { address, consumed, instructions: copied } = plan;
  // Offsets into the trampoline, as numbers: an address is made only where a branch needs one.
  const starts = layout(copied, address, consumed, trampoline);
  const newAddressOf = (target: bigint): bigint =>
    trampoline + BigInt(starts[copied.findIndex((insn) => insn.address === target)]!);
  const size = starts[copied.length]!;
  const end = trampoline + BigInt(size);
  const back = address + BigInt(consumed);
  const near = rel32(end + BigInt(JMP_REL32_SIZE), back) !== null;
  const backSize = endsInCall(copied) ? 0 : near ? JMP_REL32_SIZE : JMP_ABS_SIZE;
  // One array for the whole trampoline, each instruction written in place.
  const out = new Uint8Array(size + backSize);
  copied.forEach((insn, i) => rewrite(out, insn, starts[i]!, trampoline, address, consumed, newAddressOf));
  if (backSize === JMP_REL32_SIZE) putJmpRel32(out, size, end, back);
  else if (backSize === JMP_ABS_SIZE) out.set(jmpAbs(back), size);
  return out;
}

/**
 * True when the copy ends with a `call`: the callee returns straight to the original code after
 * the copy, so the trampoline needs no jump back.
 */
function endsInCall(copied: readonly Instruction[]): boolean {
  return copied[copied.length - 1]?.branch?.kind === "call";
}

/** The instructions that cover `minLength` bytes, after checking that moving them is safe. */
function copiedInstructions(code: Uint8Array, address: bigint, minLength: number): Instruction[] {
  if (code.length < minLength) {
    throw tooShort(address, code.length, minLength);
  }
  const copied: Instruction[] = [];
  let consumed = 0;
  while (consumed < minLength) {
    const insn = decode(code, consumed, address + BigInt(consumed));
    copied.push(insn);
    consumed += insn.length;
  }
  const end = address + BigInt(consumed);
  for (const insn of copied) {
    const branch = insn.branch;
    if (branch === undefined) continue;
    const internal = branch.target >= address && branch.target < end;
    if (internal && !copied.some((other) => other.address === branch.target)) {
      throw refuse(insn, "it branches into the middle of a copied instruction");
    }
    if (branch.kind === "xbegin") {
      throw refuse(insn, "an xbegin's abort address cannot be moved");
    }
    // The callee must see the original return address (code such as `call next; pop rcx` reads its
    // own position from it), and only the end of the copy is still there to return to.
    if (branch.kind === "call" && insn !== copied[copied.length - 1]) {
      throw refuse(
        insn,
        `it is a call returning to ${hex(insn.address + BigInt(insn.length))}, inside the ` +
          `${consumed} bytes the patch overwrites at ${hex(address)}`,
      );
    }
    if ((branch.kind === "loop" || branch.kind === "jrcxz") && !internal) {
      throw refuse(
        insn,
        `${branch.kind} has only a rel8 form and its target leaves the bytes the patch overwrites`,
      );
    }
  }
  // Where every branch leaving the copy takes its far form, internal rel8 distances are longest.
  const loops = copied.some((insn) => insn.branch?.kind === "loop" || insn.branch?.kind === "jrcxz");
  const worst = loops ? layout(copied, address, consumed, null) : [];
  copied.forEach((insn, i) => {
    const branch = insn.branch;
    if (branch?.kind !== "loop" && branch?.kind !== "jrcxz") return;
    const target = worst[copied.findIndex((other) => other.address === branch.target)]!;
    const disp = target - worst[i + 1]!;
    if (disp < -128 || disp > 127) {
      throw refuse(
        insn,
        `${branch.kind} cannot reach its target once the branches around it are widened`,
      );
    }
  });
  refuseJumpsIntoCopy(code, address, consumed);
  return copied;
}

/**
 * Throws when code after the copied bytes branches into them past the first instruction: once
 * the entry is overwritten, that branch would land in the middle of the jump. The scan stops at
 * the first bytes that do not decode, since data or padding may follow the code.
 */
function refuseJumpsIntoCopy(code: Uint8Array, address: bigint, consumed: number): void {
  const end = address + BigInt(consumed);
  const rest = code.subarray(consumed);
  if (!mayBranchInto(rest, end, address, end)) return;
  const [first] = branchesBetween(rest, end, address, end, true);
  if (first === undefined) return;
  const insn = decode(code, Number(first - address), first);
  throw refuse(
    insn,
    `it branches to ${hex(insn.branch!.target)}, inside the ${consumed} bytes the patch overwrites at ${hex(address)}`,
  );
}

/** The refusal naming `insn`. */
function refuse(insn: Instruction, reason: string): RedefineError {
  return unrelocatable(insn.address, hexBytes(insn.bytes), reason);
}

function isInternal(insn: Instruction, address: bigint, consumed: number): boolean {
  const target = insn.branch?.target;
  return target !== undefined && target >= address && target < address + BigInt(consumed);
}

/**
 * Where each copied instruction starts in a trampoline at `trampoline`, and where the copy ends, as
 * offsets from its start; with `trampoline` null, those of the largest layout any placement can
 * produce.
 */
function layout(
  copied: readonly Instruction[],
  address: bigint,
  consumed: number,
  trampoline: bigint | null,
): number[] {
  const starts = [0];
  for (const insn of copied) {
    const at = starts[starts.length - 1]!;
    starts.push(at + sizeAt(insn, trampoline, at, address, consumed));
  }
  return starts;
}

/**
 * The bytes `insn` takes in the trampoline at `trampoline` when placed `offset` bytes into it, or
 * at most when `trampoline` is null: a branch leaving the copy takes its far form when its new
 * place cannot reach the target.
 */
function sizeAt(
  insn: Instruction,
  trampoline: bigint | null,
  offset: number,
  address: bigint,
  consumed: number,
): number {
  const branch = insn.branch;
  if (
    branch === undefined || branch.kind === "loop" || branch.kind === "jrcxz" ||
    branch.kind === "xbegin"
  ) {
    return insn.length;
  }
  const form = FORMS[branch.kind];
  if (isInternal(insn, address, consumed)) return form.near;
  if (trampoline === null) return form.far;
  return rel32(trampoline + BigInt(offset + form.near), branch.target) === null ? form.far : form.near;
}

/**
 * `insn` rewritten to run `offset` bytes into the trampoline at `trampoline`, written there in `out`.
 * `newAddressOf` maps the target of a branch that stays inside the copy to that target's place in
 * the trampoline.
 */
function rewrite(
  out: Uint8Array,
  insn: Instruction,
  offset: number,
  trampoline: bigint,
  address: bigint,
  consumed: number,
  newAddressOf: (target: bigint) => bigint,
): void {
  const { branch, ripRelative } = insn;
  if (ripRelative === undefined && branch === undefined) {
    out.set(insn.bytes, offset);
    return;
  }
  const at = trampoline + BigInt(offset);
  if (ripRelative !== undefined) {
    const disp = rel32(at + BigInt(insn.length), ripRelative.target);
    if (disp === null) {
      throw refuse(
        insn,
        `it addresses ${hex(ripRelative.target)} relative to the instruction pointer, out of ` +
          `±2 GiB reach from the trampoline at ${hex(at)}`,
      );
    }
    out.set(insn.bytes, offset);
    putI32(out, offset + ripRelative.dispOffset, disp);
    return;
  }
  if (branch === undefined) return;

  const target = isInternal(insn, address, consumed) ? newAddressOf(branch.target) : branch.target;
  const size = sizeAt(insn, trampoline, offset, address, consumed);
  const disp = target - (at + BigInt(size));
  if (branch.kind === "loop" || branch.kind === "jrcxz") {
    // Kept whole, prefixes included: a 67 prefix makes them count with ecx instead of rcx.
    // copiedInstructions() has checked that the rel8 reaches.
    out.set(insn.bytes, offset);
    out[offset + branch.relOffset] = Number(BigInt.asUintN(8, disp));
    return;
  }
  out.set(branchForm(branch, size, disp, target, address + BigInt(consumed)), offset);
}

/**
 * A copied branch of `size` bytes in its new form: `disp` reaches `target` from the form's end
 * (near forms); a call first pushes `returnTo`, the original return address.
 */
function branchForm(branch: Branch, size: number, disp: bigint, target: bigint, returnTo: bigint): Uint8Array {
  const condition = branch.condition ?? 0;
  switch (branch.kind) {
    case "jcc":
      return size === FORMS.jcc.near
        ? Uint8Array.of(
          0x0f, 0x80 | condition, ...i32le(Number(disp)), // jcc rel32
        )
        : Uint8Array.of(
          0x70 | (condition ^ 1), JMP_ABS_SIZE, // j!cc over the absolute jump
          ...jmpAbs(target),
        );
    case "call":
      // As the original call would have: its return address pushed, then the jump to the callee.
      return concat([
        pushAddress(returnTo),
        size === FORMS.call.near
          ? Uint8Array.of(
            0xe9, ...i32le(Number(disp)), // jmp rel32
          )
          : jmpAbs(target),
      ]);
    default:
      return size === FORMS.jmp.near
        ? Uint8Array.of(
          0xe9, ...i32le(Number(disp)), // jmp rel32
        )
        : jmpAbs(target);
  }
}
