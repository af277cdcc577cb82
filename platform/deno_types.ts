/**
 * What platform/deno.ts uses of Deno's FFI, declared here rather than taken from the global `Deno`
 * namespace: the sources must type-check where there is none (a Bun or Node project's own type
 * check compiles them), so the adapter reads `Deno` from `globalThis` as a `DenoFfi`.
 * test/deno_types_check.ts holds Deno's own declarations to these.
 */

/** A parameter type name of Deno's FFI, as the adapter uses them (pointers travel as `usize`). */
export type DenoParameterType =
  | "i8" | "u8" | "i16" | "u16" | "i32" | "u32" | "i64" | "u64"
  | "usize" | "isize" | "f32" | "f64" | "bool" | "buffer";

/** A result type name of Deno's FFI: a parameter type or `void`. */
export type DenoResultType = DenoParameterType | "void";

/** A foreign function's parameters and result, and whether a missing symbol is null. */
export interface DenoDefinition {
  readonly parameters: readonly DenoParameterType[];
  readonly result: DenoResultType;
  readonly optional?: boolean;
}

/** Deno's opaque pointer object; only `UnsafePointer` makes and reads them. */
export type DenoPointer = object;

/** A native function bound by Deno: numbers, bigints, booleans and buffers in, the result out. */
export type DenoCall = (...args: never[]) => unknown;

/** The members of `Deno` the adapter uses. */
export interface DenoFfi {
  readonly build: { readonly os: string; readonly arch: string };
  dlopen(path: string, symbols: Record<string, DenoDefinition>): { readonly symbols: Record<string, DenoCall> };
  readonly UnsafePointer: {
    create(address: bigint): DenoPointer | null;
    value(pointer: DenoPointer | null): bigint | number;
  };
  readonly UnsafePointerView: {
    getArrayBuffer(pointer: DenoPointer, length: number): ArrayBuffer;
    getCString(pointer: DenoPointer): string;
  };
  readonly UnsafeCallback: new (
    definition: DenoDefinition,
    fn: (...args: (number | bigint | boolean | DenoPointer | null)[]) => number | bigint | boolean | void | null,
  ) => { readonly pointer: DenoPointer; close(): void };
  /** Deno brands the pointer with the function's definition: the adapter's pointer goes in `as never`. */
  readonly UnsafeFnPointer: new (pointer: never, definition: DenoDefinition) => { call: DenoCall };
}
