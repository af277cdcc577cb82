/**
 * The introspection methods of an OS layer whose loaded images we cannot read yet: each one says
 * so with UNSUPPORTED_PLATFORM instead of guessing.
 */
import { RedefineError } from "../src/errors.ts";
import type { Os } from "./types.ts";

/** `modules`, `exports` and `imports` for `system`, each refusing. */
export function noIntrospection(system: string): Pick<Os, "modules" | "exports" | "imports"> {
  const refuse = (what: string) => (): never => {
    throw new RedefineError("UNSUPPORTED_PLATFORM", `${what} is not implemented on ${system} yet (Linux and Windows only).`);
  };
  return {
    modules: refuse("listing loaded modules"),
    exports: refuse("reading a module's exports"),
    imports: refuse("reading a module's import slots"),
  };
}
