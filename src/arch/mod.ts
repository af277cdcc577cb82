/**
 * The instruction-set layer: everything `redefine` needs to know about machine code, as pure
 * functions (bytes and addresses in, bytes out). One implementation per architecture, chosen by
 * `archFor()`; the contract they share is in `types.ts`.
 */
import { RedefineError } from "../errors.ts";
import type { Arch } from "./types.ts";
import { x86_64 } from "./x86_64/mod.ts";
import { aarch64 } from "./aarch64/mod.ts";

/** The instruction set for a CPU architecture name as the runtimes report it. */
export function archFor(arch: string): Arch {
  switch (arch) {
    case "x86_64":
    case "x64":
      return x86_64;
    case "aarch64":
    case "arm64":
      return aarch64;
    default:
      throw new RedefineError(
        "UNSUPPORTED_PLATFORM",
        `redefine supports x86_64 and aarch64 CPUs, not '${arch}'.`,
      );
  }
}
