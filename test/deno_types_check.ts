// Type-checked only (deno check, tsc with Deno's declarations): Deno's own FFI declarations fit
// platform/deno_types.ts, the subset platform/deno.ts declares for itself.
import type { DenoFfi } from "../platform/deno_types.ts";

/** Deno, as the adapter sees it: a compile error here when Deno's FFI no longer matches. */
export const denoFfi: (deno: typeof Deno) => DenoFfi = (deno) => deno;
