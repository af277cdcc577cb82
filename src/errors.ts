/**
 * The one error type of `redefine`. Every failure has a stable `code` a program can switch on and a
 * message that names the address, bytes or errno involved and says what to do about it.
 */

/**
 * Every failure kind `redefine` reports. The strings are stable across releases.
 *
 * @example
 * ```ts
 * import { RedefineError } from "@redefine/redefine";
 * import type { RedefineErrorCode } from "@redefine/redefine";
 * function codeOf(error: unknown): RedefineErrorCode | null {
 *   return error instanceof RedefineError ? error.code : null;
 * }
 * ```
 */
export type RedefineErrorCode =
  | "SYMBOL_NOT_FOUND"
  | "LIBRARY_NOT_FOUND"
  | "INVALID_ADDRESS"
  | "FUNCTION_TOO_SHORT"
  | "UNRELOCATABLE"
  | "BRANCH_PROTECTION"
  | "ALREADY_PATCHED"
  | "PATCH_MODIFIED"
  | "PROTECT_FAILED"
  | "ALLOCATION_FAILED"
  | "UNSUPPORTED_PLATFORM"
  | "FFI_PERMISSION"
  | "BAD_SIGNATURE"
  | "BAD_REPLACEMENT"
  | "UNKNOWN_SIZE"
  | "OUT_OF_ORDER"
  | "UNLOADED"
  | "RESTORED"
  | "NOT_IMPORTED";

/**
 * Raised for every failure of `redefine`; nothing has been written when it is thrown from
 * `redefine()`.
 *
 * @example
 * ```ts
 * import { RedefineError } from "@redefine/redefine";
 * const error = new RedefineError("SYMBOL_NOT_FOUND", "no symbol 'nope' in the process");
 * console.log(error.code); // "SYMBOL_NOT_FOUND"
 * ```
 */
export class RedefineError extends Error {
  /** The stable failure kind. */
  readonly code: RedefineErrorCode;

  /** Makes an error of kind `code`; `message` says what failed and what to do. */
  constructor(code: RedefineErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "RedefineError";
    this.code = code;
  }
}

/** `0x7f12_3456_789a` style, for messages. */
export function hex(address: bigint | number): string {
  return "0x" + address.toString(16);
}

/** A distance either way, as messages say a jump's reach: `±128 MiB`, `±4 GiB`. */
export function spanText(reach: bigint): string {
  const mib = Math.round(Number(reach) / 2 ** 20);
  return `±${mib >= 1024 ? `${mib / 1024} GiB` : `${mib} MiB`}`;
}

/** `48 8b 05 ...` style, for messages that name instruction bytes. */
export function hexBytes(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(" ");
}
