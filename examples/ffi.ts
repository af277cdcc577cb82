/**
 * How a program calls native functions on each runtime: the examples use this to play the part
 * of a native caller. (Your own code would just use `Deno.dlopen`, `bun:ffi` or `node:ffi` directly.)
 */
type Definition = { parameters: string[]; result: string };
// deno-lint-ignore no-explicit-any
type Fn = (...args: any[]) => any;

const deno = (globalThis as { Deno?: typeof Deno }).Deno;
const isBun = (globalThis as { Bun?: unknown }).Bun !== undefined;
// `bun:ffi` can only be imported dynamically: a static import breaks Deno and Node.
const bunFfi = isBun ? await import("bun:ffi" as string) : undefined;
const nodeFfi = deno || isBun ? undefined : await import("node:ffi" as string);

/** Binds `symbols` of `library` with whichever runtime runs this file. */
export function open(library: string, symbols: Record<string, Definition>): Record<string, Fn> {
  if (deno) return deno.dlopen(library, symbols as Record<string, Deno.ForeignFunction>).symbols as never;
  if (nodeFfi) {
    // The examples' type names (i32, u32, buffer, pointer) are node:ffi's too.
    const node = Object.fromEntries(
      Object.entries(symbols).map(([name, d]) => [name, { arguments: d.parameters, return: d.result }]),
    );
    return nodeFfi.dlopen(library, node).functions;
  }
  const bun = Object.fromEntries(
    Object.entries(symbols).map(([name, d]) => [name, { args: d.parameters, returns: d.result }]),
  );
  return bunFfi.dlopen(library, bun).symbols;
}

/** A NUL-terminated C string. */
export function cstr(text: string): Uint8Array {
  return new TextEncoder().encode(text + "\0");
}

/** The C string at `address`. */
export function readCString(address: bigint): string {
  if (deno) return deno.UnsafePointerView.getCString(deno.UnsafePointer.create(address)!);
  if (nodeFfi) return nodeFfi.toString(address);
  return new bunFfi.CString(Number(address)).toString();
}
