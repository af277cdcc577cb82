/**
 * The code in front of JS replacements, as the patches' layouts place it: each guard's bytes and
 * data for its slot (with the isolate's identity word, src/registry.ts), the code shared by many
 * guards (placed once per region), and the runtime's own code with the part of it that is its FFI,
 * learnt once by running the guard's own read of the return address through the FFI.
 */
import { hex, RedefineError } from "./errors.ts";
import type { GuardLayout, GuardOptions, RuntimeCode } from "./arch/types.ts";
import type { CodeSlot } from "./code_memory.ts";
import type { Signature } from "./signature.ts";
import { isolateIdentity, liveBytes } from "./registry.ts";
import type { Machine } from "./registry.ts";
/** The guard's layout for `signature`: its shared code is assembled once, not once a patch. */
export function guardShape(m: Machine, signature: Signature): GuardLayout {
  const { os } = m.platform.runtime;
  const key = `${os}:${signature.parameters.join()}:${signature.result}`;
  let shape = m.guardLayouts.get(key);
  if (shape === undefined) m.guardLayouts.set(key, shape = m.arch.guard!.layout(os, signature));
  return shape;
}

/**
 * Writes the first data of the guard for `front` in `slot` (`shape` is its `guardShape`) into the
 * slot's data, in place, and returns what the guard is made of, for `Arch.guard.encode` to make
 * its code: a slot taken back with the guard's code in place needs the data only.
 */
export function guardOptions(
  m: Machine,
  signature: Signature,
  shape: GuardLayout,
  slot: CodeSlot,
  front: bigint,
  callback: bigint,
  original: bigint,
): GuardOptions {
  const options = {
    at: front,
    data: slot.data,
    identity: isolateIdentity(),
    callback,
    original,
    runtimeCode: runtimeCodeOf(m, front),
    os: m.platform.runtime.os,
    signature,
    shared: shape.shared ? sharedCode(m, shape.shared, front) : undefined,
  };
  m.arch.guard!.data(options, liveBytes(slot.data, shape.dataSize));
  return options;
}

/**
 * A copy of `code` (code shared by many patches, such as the calling guard) within near-jump
 * reach of `near`: placed once per region and reused.
 */
function sharedCode(m: Machine, code: Uint8Array, near: bigint): bigint {
  // By its bytes, worked out once per copy of them (the guard's layouts are kept, and with them
  // their shared code).
  let key = m.sharedKeys.get(code);
  if (key === undefined) m.sharedKeys.set(code, key = code.join());
  const reach = m.arch.entryJumps[0].reach - BigInt(code.length) - 4096n;
  const copies = m.shared.get(key) ?? [];
  // Indexed, with no closure: asked for every guard made.
  for (let i = 0; i < copies.length; i++) {
    const at = copies[i]!;
    if ((at > near ? at - near : near - at) < reach) return at;
  }
  const slot = m.pool.allocate(near, reach, code.length);
  if (!slot) {
    throw new RedefineError(
      "ALLOCATION_FAILED",
      `no executable memory near ${hex(near)} for the guard.`,
    );
  }
  m.pool.write(slot, code);
  m.shared.set(key, [...copies, slot.address]);
  return slot.address;
}

/**
 * Signatures the FFI path is probed with: libffi picks its call instruction by the kinds of the
 * arguments (Node 26's has one per count of integer arguments up to six, and a general one).
 */
const FFI_PROBES: readonly Signature[] = [
  { parameters: [], result: "u64" },
  { parameters: ["i64", "i64", "i64", "i64", "i64", "i64"], result: "u64" },
  { parameters: ["i64", "i64", "i64", "i64", "i64", "i64", "i64", "f64"], result: "u64" },
];

/**
 * How far either side of the call instructions seen, the FFI's others can lie: libffi's sit
 * together in its hand-written call routines (Node 26's span 0x134 bytes), and the VM's own calls
 * are megabytes away.
 */
const FFI_SPREAD = 4096n;

/**
 * The runtime's own code, for the guard: its executable's text, and the part of it whose calls
 * are the FFI's, found by calling the guard's own read of the return address through the FFI
 * (Deno's and Node's libffi sits inside their executables; Bun's FFI calls come from JIT code
 * outside, so none of its text is the FFI's). Where the OS layer cannot tell the text, no call is
 * the runtime's own. Learnt once.
 */
function runtimeCodeOf(m: Machine, near: bigint): RuntimeCode {
  if (m.runtimeCode) return m.runtimeCode;
  const text = m.platform.os.programText?.() ?? null;
  if (!text) return (m.runtimeCode = { start: 0n, end: 0n, ffiStart: 0n, ffiEnd: 0n });
  const at = sharedCode(m, m.arch.guard!.returnAddressReader(), near);
  const sites = FFI_PROBES.map((signature) => {
    const zeros = signature.parameters.map((type) => (type === "f64" ? 0 : 0n));
    return BigInt(m.platform.runtime.fnPointer(at, signature)(...zeros));
  }).filter((site) => site >= text.start && site < text.end);
  const low = sites.reduce((a, b) => (b < a ? b : a), text.end);
  const high = sites.reduce((a, b) => (b > a ? b : a), text.start);
  m.runtimeCode = sites.length === 0
    ? { start: text.start, end: text.end, ffiStart: 0n, ffiEnd: 0n }
    : { start: text.start, end: text.end, ffiStart: low - FFI_SPREAD, ffiEnd: high + FFI_SPREAD };
  return m.runtimeCode;
}
