/**
 * The instruction-set layer: everything `redefine` needs to know about machine code, as pure
 * functions (bytes and addresses in, bytes out). One implementation per architecture, chosen by
 * `archFor()`; the contract they share is in `types.ts`. Only this process's CPU's implementation
 * is loaded (with this module): start-up does not pay for the other one's code.
 */
import { RedefineError } from "../errors.ts";
import type { Arch } from "./types.ts";
import { cpu } from "../../platform/mod.ts";

/** The instruction set's name for a CPU architecture name as the runtimes report it. */
function archName(arch: string | null): "x86_64" | "aarch64" | null {
  switch (arch) {
    case "x86_64":
    case "x64":
      return "x86_64";
    case "aarch64":
    case "arm64":
      return "aarch64";
    default:
      return null;
  }
}

const native: Arch | null = archName(cpu) === "x86_64"
  ? (await import("./x86_64/mod.ts")).x86_64
  : archName(cpu) === "aarch64"
  ? (await import("./aarch64/mod.ts")).aarch64
  : null;

/**
 * The instruction set for a CPU architecture name as the runtimes report it: this process's own
 * (the other one's tests import it from its directory).
 */
export function archFor(arch: string): Arch {
  const name = archName(arch);
  if (name === null) {
    throw new RedefineError("UNSUPPORTED_PLATFORM", `redefine supports x86_64 and aarch64 CPUs, not '${arch}'.`);
  }
  if (native?.name !== name) {
    throw new RedefineError(
      "UNSUPPORTED_PLATFORM",
      `this process runs on '${cpu}', so only its own instruction set is loaded: ` +
        `import the ${name} one from src/arch/${name}/mod.ts.`,
    );
  }
  return native;
}
