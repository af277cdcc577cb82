/**
 * Detects the runtime, the OS and the CPU once and hands `src/` one Platform object; the one door
 * from `src/` into `platform/` (the stub image builder src/original.ts uses included). The runtime
 * adapter and this OS's layer are loaded when this module is (Bun's FFI can only be imported
 * dynamically, and a process has no use for another OS's layer: start-up pays only for its own);
 * the OS layer itself, which opens libc and so needs FFI permission, is made on first use, so a
 * missing permission surfaces as a typed error from the call that needed it.
 */
import { RedefineError } from "../src/errors.ts";
import type { Os, Platform, Runtime } from "./types.ts";

export type * from "./types.ts";
export { PROT_EXEC, PROT_READ, PROT_WRITE, sameFile, sameMemory } from "./types.ts";
export { buildStubImage, type StubImage } from "./image/elf.ts";
export { farPlace } from "./address_space.ts";
export { lazyLibrary } from "./lazy_library.ts";
export type { SymbolName } from "./lazy_library.ts";

const SUPPORTED = ["linux", "darwin", "windows"];

/** Makes the OS layer over a runtime: `linux()`, `darwin()` or `windows()`. */
export type OsLayer = (runtime: Runtime) => Os;

// Deno and Bun define `process` too: they are told apart first.
const global = globalThis as { Deno?: unknown; Bun?: unknown; process?: { versions?: { node?: string } } };
const runtime: Runtime | null = global.Deno !== undefined
  ? (await import("./deno.ts")).deno
  : global.Bun !== undefined
  ? (await import("./bun.ts")).bun
  : global.process?.versions?.node !== undefined
  ? (await import("./node.ts")).node
  : null;

/**
 * The layer for an operating system, its module loaded on first ask (string-literal imports, so
 * that JSR's and Deno's module graphs still see every file); an OS redefine does not support
 * throws at once.
 */
export function osLayer(os: string): Promise<OsLayer> {
  switch (os) {
    case "linux":
      return import("./linux.ts").then((m) => m.linux);
    case "darwin":
      return import("./darwin.ts").then((m) => m.darwin);
    case "windows":
      return import("./windows.ts").then((m) => m.windows);
    default:
      throw unsupported(os);
  }
}

/** The OS layer for `runtime`'s operating system. */
export function osFor(runtime: Runtime): Promise<Os> {
  return osLayer(runtime.os).then((layer) => layer(runtime));
}

function unsupported(os: string): RedefineError {
  return new RedefineError(
    "UNSUPPORTED_PLATFORM",
    `redefine does not support the '${os}' operating system yet (supported: ${SUPPORTED.join(", ")}).`,
  );
}

// This process's own layer; an OS redefine does not support is reported by `platform()`, when used.
const own: OsLayer | null = runtime !== null && SUPPORTED.includes(runtime.os)
  ? await osLayer(runtime.os)
  : null;

/**
 * This process's CPU as its runtime names it (`"x86_64"` or `"x64"`, `"aarch64"` or `"arm64"`),
 * or null on a runtime redefine does not run on: src/arch/mod.ts loads that instruction set only.
 */
export const cpu: string | null = runtime?.arch ?? null;

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
  if (own === null) throw unsupported(runtime.os);
  current = { runtime, os: own(runtime) };
  return current;
}
