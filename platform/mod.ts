/**
 * Detects the runtime, the OS and the CPU once and hands `src/` one Platform object; the one door
 * from `src/` into `platform/` (the stub image builder src/original.ts uses included). The runtime
 * adapter is loaded when this module is (Bun's FFI can only be imported dynamically); the OS layer,
 * which opens libc and so needs FFI permission, is made on first use, so a missing permission
 * surfaces as a typed error from the call that needed it.
 */
import { RedefineError } from "../src/errors.ts";
import { darwin } from "./darwin.ts";
import { linux } from "./linux.ts";
import { windows } from "./windows.ts";
import type { Os, Platform, Runtime } from "./types.ts";

export type * from "./types.ts";
export { PROT_EXEC, PROT_READ, PROT_WRITE } from "./types.ts";
export { buildStubImage, type StubImage } from "./image/elf.ts";
export { farPlace } from "./address_space.ts";

// Deno and Bun define `process` too: they are told apart first.
const global = globalThis as { Deno?: unknown; Bun?: unknown; process?: { versions?: { node?: string } } };
const runtime: Runtime | null = global.Deno !== undefined
  ? (await import("./deno.ts")).deno
  : global.Bun !== undefined
  ? (await import("./bun.ts")).bun
  : global.process?.versions?.node !== undefined
  ? (await import("./node.ts")).node
  : null;

/** The OS layer for `runtime`'s operating system. */
export function osFor(runtime: Runtime): Os {
  switch (runtime.os) {
    case "linux":
      return linux(runtime);
    case "darwin":
      return darwin(runtime);
    case "windows":
      return windows(runtime);
    default:
      throw new RedefineError(
        "UNSUPPORTED_PLATFORM",
        `redefine does not support the '${runtime.os}' operating system yet (supported: linux, darwin, windows).`,
      );
  }
}

let current: Platform | undefined;

/** The platform of this process, made once on first use. */
export function platform(): Platform {
  if (current) return current;
  if (runtime === null) {
    throw new RedefineError(
      "UNSUPPORTED_PLATFORM",
      global.process?.versions?.node !== undefined
        ? `redefine needs node:ffi, which this Node (${global.process.versions.node}) lacks: use Node 26 or ` +
          `later, without --no-experimental-ffi.`
        : "redefine runs on Deno, Bun and Node 26 or later (their FFI does the work); this runtime is none of them.",
    );
  }
  current = { runtime, os: osFor(runtime) };
  return current;
}
