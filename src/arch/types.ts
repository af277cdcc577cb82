/**
 * The contract between `src/` and an instruction set: what `redefine` asks of the machine code
 * layer (entry jumps, relocation, guards), as pure functions of bytes and addresses.
 */
import type { CannedPlan, CannedSpec } from "./canned.ts";
import type { Signature } from "../signature.ts";
import type { ProbeCode } from "./probe.ts";
import type { BranchChecks } from "../../platform/types.ts";

/**
 * The instructions a relocation moves, decoded once by `Arch.planRelocation` and written by
 * `Arch.relocate`: the reader and the writer of Frida's gum relocator, split at the plan.
 * `Instruction` is the arch's own decoded form; `src/` reads only the sizes.
 */
export interface RelocationPlan<Instruction = unknown> {
  /** Where the moved instructions run today: the patch point. */
  readonly address: bigint;
  /** Bytes of the original code, from the patch point, that the relocated copy replaces. */
  readonly consumed: number;
  /** Upper bound of the trampoline's size (relocated code and any jump back), wherever it lands. */
  readonly maxSize: number;
  /** The moved instructions, in order, as the arch's decoder gave them. */
  readonly instructions: readonly Instruction[];
}

/**
 * The runtime's own code: the VM calls functions from there at moments when JS may not run (V8
 * calls `getpid` during garbage collection), so a guard sends calls returning into `[start, end)`
 * to the original — all but those returning into `[ffiStart, ffiEnd)`, where the runtime's FFI
 * (libffi, inside Deno's and Node's executables) calls native code for the program. All zeros:
 * no such range, every call passes.
 */
export interface RuntimeCode {
  readonly start: bigint;
  readonly end: bigint;
  readonly ffiStart: bigint;
  readonly ffiEnd: bigint;
}

/** Where a guard stub lives and where it sends calls (see src/arch/x86_64/guard.ts). */
export interface GuardOptions {
  /** Where the guard's code is placed. */
  readonly at: bigint;
  /** Its read+write data slot (`guardDataSize` bytes), within pc-relative reach of `at`. */
  readonly data: bigint;
  /**
   * Where the isolate's identity word is: the JS thread's pointer (as `threadPointerReader`
   * returns it there) while the isolate lives, 0 once it ended — then no thread matches, and every
   * call goes to the original, even from a new thread glibc started on the dead one's stack.
   */
  readonly identity: bigint;
  /** The JS replacement's native entry (the runtime's callback). */
  readonly callback: bigint;
  /** The original function, relocated (the trampoline). */
  readonly original: bigint;
  /** Whose calls go to the original, wherever they come from. */
  readonly runtimeCode: RuntimeCode;
  /** The operating system: where the thread pointer lives differs, and the calling convention. */
  readonly os: string;
  /** The replacement's signature: without stack-passed arguments the guard can simply call it. */
  readonly signature: Signature;
  /** Where the layout's shared code was placed, when it has some. */
  readonly shared?: bigint | undefined;
}

/** See `Arch.guard.layout`. */
export interface GuardLayout {
  readonly size: number;
  readonly dataSize: number;
  readonly busyOffset: number;
  readonly shared: Uint8Array | null;
}

/** The process-wide registry's atomic operations as code (see src/shared_registry.ts). */
export interface RegistryLockCode {
  /** `cas(word, expected, desired) → previous` at offset 0, then `clear(word)` at `clear`. */
  readonly code: Uint8Array;
  readonly clear: number;
}

// The platform's (it tells both for its memory), and the arch code's vocabulary too.
export { ANYWHERE, UNCHECKED } from "../../platform/types.ts";
export type { BranchChecks } from "../../platform/types.ts";

/** One form of the entry jump: it clobbers no argument register, so it can sit at any entry. */
export interface EntryJump {
  /** Its length in bytes. */
  readonly size: number;
  /** Largest distance, either way, from where it is placed to a target it surely reaches. */
  readonly reach: bigint;
  /** The jump placed at `from` to `to`, or null when `to` is out of its reach. */
  encode(from: bigint, to: bigint): Uint8Array | null;
}

/** What `src/` asks of an instruction set. */
export interface Arch {
  readonly name: "x86_64" | "aarch64";
  /**
   * The forms of the entry jump, shortest first, each reaching farther than the one before; the
   * last reaches `ANYWHERE`. A patch takes the first whose reach holds memory it can have.
   */
  readonly entryJumps: readonly [EntryJump, ...EntryJump[]];
  /** A jump to itself: what a live entry holds while a multi-store write is under way. */
  readonly selfLoop: Uint8Array;
  /** Bytes at the entry that must stay in place (`endbr64`, `bti c`): the patch goes after them. */
  landingPadLength(code: Uint8Array): number;
  /**
   * Decides how many whole instructions from `address` must move to free `minLength` bytes, and
   * how large their relocated copy can get. Throws `UNRELOCATABLE` for what cannot be moved.
   * `code` holds the bytes from `address` to the end of the function's known extent.
   */
  planRelocation(code: Uint8Array, address: bigint, minLength: number): RelocationPlan;
  /**
   * The trampoline for `trampoline`: the instructions of `plan` (made by this arch's
   * `planRelocation`), rewritten to run there, then a jump back to `plan.address + plan.consumed`
   * (or, when they end with a call, that call with the original's return address, so that the
   * callee returns there itself). At most `plan.maxSize` bytes. Throws `UNRELOCATABLE` for what
   * cannot reach from there, `BRANCH_PROTECTION` for a jump back that `checks` (the function's
   * pages', `UNCHECKED` when absent) would fault.
   */
  relocate(plan: RelocationPlan, trampoline: bigint, checks?: BranchChecks): Uint8Array;
  /**
   * How many bytes from `address` are surely this function's code when no symbol tells its size:
   * the instructions up to and including the first unconditional transfer (or the first that does
   * not decode). Execution runs through all of them from the entry, so they belong to it.
   */
  straightLineLength(code: Uint8Array, address: bigint): number;
  /**
   * Addresses of the relative branches in `code` (which starts at `address`) that land strictly
   * between `from` and `to`. Decodes linearly and steps over bytes that do not decode, so it may
   * find branches that are not really there, never fewer than there are on that path.
   */
  branchesInto(code: Uint8Array, address: bigint, from: bigint, to: bigint): bigint[];
  /**
   * Whether `offset` starts an instruction when `code` (at `address`) is decoded from its first
   * byte: true, false (it falls inside one), or null when decoding stops before reaching it.
   */
  startsInstruction(code: Uint8Array, address: bigint, offset: number): boolean | null;
  /** Size of `indirectJump`. */
  readonly indirectJumpSize: number;
  /**
   * A jump placed at `from` through the 8-byte pointer at `slot` (within pc-relative reach);
   * position independent, clobbering no argument register.
   */
  indirectJump(from: bigint, slot: bigint): Uint8Array;
  /** Compare-and-swap and clear of a word in native memory, for `os`'s calling convention. */
  registryLock(os: string): RegistryLockCode;
  /** Canned native replacements (src/arch/canned.ts): the code of a spec, sized before it is placed. */
  readonly canned?: (spec: CannedSpec, os: string) => CannedPlan;
  /** The native counting and timing probe (src/arch/probe.ts). */
  readonly probe?: ProbeCode;
  /**
   * The guard stub in front of JS replacements: calls from other threads, and re-entrant calls on
   * the JS thread, go to the original. Absent where it is not written yet.
   */
  readonly guard?: {
    /**
     * What one patch's guard takes for `signature` on `os`: code bytes, data bytes (at
     * `busyOffset` of the data, the busy flag: bit 0 while the replacement runs, bit 1 once the
     * patch is retired — any bit set sends calls to the original), and code shared by many
     * patches, placed once within reach of them (`GuardOptions.shared`), if any.
     */
    layout(os: string, signature: Signature): GuardLayout;
    /** A function returning the current thread's identity, as the guard compares it. */
    threadPointerReader(os: string): Uint8Array;
    /**
     * A function returning its own return address, as the guard reads it: called through the
     * runtime's FFI, it tells where `RuntimeCode`'s FFI range is.
     */
    returnAddressReader(): Uint8Array;
    /** The patch's guard code at `options.at`. */
    encode(options: GuardOptions): Uint8Array;
    /**
     * Writes the first contents of the patch's guard data (`layout().dataSize` bytes, for
     * `options.data`) into `into`, in place: a slot taken back for the same code needs only this.
     */
    data(options: GuardOptions, into: Uint8Array): void;
  };
}
