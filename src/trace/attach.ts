/**
 * `attach()`: a probe around a native function, Frida's `Interceptor.attach` over `redefine`. The
 * probe is a JS replacement that calls `onEnter`, then the original at the runtime's full FFI
 * speed (`patch.original`), then `onLeave`, which may replace the result. It rides the guard that
 * stands in front of every JS replacement, so calls from other threads, and calls the function
 * receives while a callback of this probe is running, go straight to the original unobserved.
 */
import type { JsValue, NativeType } from "../signature.ts";
import type { Target } from "../target.ts";
import type { Patch } from "../patch.ts";
import { redefine } from "../redefine.ts";
import { RedefineError } from "../errors.ts";

/**
 * The arguments of one call as a probe's callbacks see them: the JS values of the signature's
 * parameters, in an array that `onEnter` may change before the original runs.
 *
 * @example
 * ```ts
 * import type { ProbeArguments } from "@redefine/redefine";
 * const args: ProbeArguments<["pointer", "i32"]> = [0n, 10];
 * args[1] = 16;
 * ```
 */
export type ProbeArguments<P extends readonly NativeType[]> = { -readonly [K in keyof P]: JsValue<P[K]> };

/**
 * What a probe runs around each call it sees. Both callbacks of one call receive the same `args`
 * array (so `onEnter` may leave notes on it for `onLeave`); pointers are `bigint` addresses.
 *
 * @example
 * ```ts
 * import type { ProbeCallbacks } from "@redefine/redefine";
 * const double: ProbeCallbacks<["i64"], "i64"> = { onLeave: (result) => result * 2n };
 * ```
 */
export interface ProbeCallbacks<P extends readonly NativeType[], R extends NativeType> {
  /** Before the original runs, with the call's arguments. */
  onEnter?(args: ProbeArguments<P>): void;
  /**
   * After the original returned `result`. Returning a value (not `undefined`) makes it the
   * result the caller gets.
   */
  onLeave?(result: JsValue<R>, args: ProbeArguments<P>): JsValue<R> | void;
}

/**
 * A live probe made by `attach()`. `restore()` (or leaving a `using` scope) takes it off and puts
 * the function's bytes back exactly.
 *
 * @example
 * ```ts
 * import { attach } from "@redefine/redefine";
 * const probe = attach({ symbol: "labs", parameters: ["i64"], result: "i64" }, {});
 * probe.calls; // 0: no native caller has called labs yet
 * probe.restore();
 * ```
 */
export class Probe<P extends readonly NativeType[], R extends NativeType> {
  /** The patch that carries the probe (its entry, trampoline, `original`). */
  readonly patch: Patch<P, R>;
  readonly #counted: { calls: number };

  /** @internal Made by `attach()`. */
  constructor(patch: Patch<P, R>, counted: { calls: number }) {
    this.patch = patch;
    this.#counted = counted;
  }

  /** Calls the probe has seen: those made on the JS thread while no callback of it was running. */
  get calls(): number {
    return this.#counted.calls;
  }

  /** True until the probe is restored. */
  get active(): boolean {
    return this.patch.active;
  }

  /** Takes the probe off: the function's bytes and page protections come back exactly. */
  restore(): void {
    this.patch.restore();
  }

  /** Restores at the end of a `using` scope. */
  [Symbol.dispose](): void {
    this.restore();
  }
}

/**
 * Attaches a probe to a native function: every call made on the JS thread runs `onEnter(args)`,
 * the original function, then `onLeave(result, args)`, whose return value (when not `undefined`)
 * replaces the result. Calls from other threads, and calls made while one of the callbacks is
 * running (re-entrant ones, the runtime's own), go straight to the original, uncounted. A
 * callback that throws makes the call return 0 to its native caller; the error surfaces in JS.
 * The target is any `redefine()` target, so it may be scoped to some callers where that exists.
 *
 * @example
 * ```ts
 * import { attach } from "@redefine/redefine";
 * using probe = attach(
 *   { symbol: "strtol", library: "libc.so.6", parameters: ["pointer", "pointer", "i32"], result: "i64" },
 *   {
 *     onEnter(args) {
 *       console.log("strtol base", args[2]);
 *     },
 *     onLeave(result) {
 *       return result * 2n; // atoi("21") now gives 42
 *     },
 *   },
 * );
 * ```
 */
export function attach<const P extends readonly NativeType[], const R extends NativeType>(
  target: Target<P, R>,
  callbacks: NoInfer<ProbeCallbacks<P, R>>,
): Probe<P, R> {
  if (callbacks === null || typeof callbacks !== "object") {
    throw new RedefineError(
      "BAD_REPLACEMENT",
      "attach() takes { onEnter?(args), onLeave?(result, args) } as its second argument.",
    );
  }
  const { onEnter, onLeave } = callbacks;
  for (const [name, callback] of [["onEnter", onEnter], ["onLeave", onLeave]] as const) {
    if (callback !== undefined && typeof callback !== "function") {
      throw new RedefineError("BAD_REPLACEMENT", `attach(): ${name} must be a function or left out.`);
    }
  }
  const counted = { calls: 0 };
  const run: Run = {
    // The patch's original is known once redefine() returns; the entry jump is written by then
    // (or, in a transaction, later), so no call reaches the wrapper before.
    original: null as unknown as Run["original"],
    enter: (args) => {
      counted.calls++;
      if (onEnter) (onEnter as (args: unknown[]) => void)(args);
    },
    leave: onLeave
      ? (result, args) => {
        const replaced = (onLeave as (result: unknown, args: unknown[]) => unknown)(result, args);
        return replaced === undefined ? result : replaced;
      }
      : (result) => result,
  };
  const patch = redefine(target, wrapperOf(target.parameters.length, run) as never) as Patch<P, R>;
  run.original = patch.original as Run["original"];
  return new Probe(patch, counted);
}

/** What a probe's wrapper runs: the callbacks around the original. */
interface Run {
  original: (...args: unknown[]) => unknown;
  enter(args: unknown[]): void;
  leave(result: unknown, args: unknown[]): unknown;
}

/**
 * A function of exactly `arity` parameters around the original, calling it with fixed arguments
 * too: the runtime's callback passes fixed arguments, and its fast call path wants them, where a
 * rest parameter and a spread call would cost a third more. The original gets `args` as the
 * callbacks left them, so `onEnter` may change an argument.
 */
function wrapperOf(arity: number, run: Run): (...args: unknown[]) => unknown {
  switch (arity) {
    case 0:
      return () => {
        const args: unknown[] = [];
        run.enter(args);
        return run.leave(run.original(), args);
      };
    case 1:
      return (a) => {
        const args = [a];
        run.enter(args);
        return run.leave(run.original(args[0]), args);
      };
    case 2:
      return (a, b) => {
        const args = [a, b];
        run.enter(args);
        return run.leave(run.original(args[0], args[1]), args);
      };
    case 3:
      return (a, b, c) => {
        const args = [a, b, c];
        run.enter(args);
        return run.leave(run.original(args[0], args[1], args[2]), args);
      };
    case 4:
      return (a, b, c, d) => {
        const args = [a, b, c, d];
        run.enter(args);
        return run.leave(run.original(args[0], args[1], args[2], args[3]), args);
      };
    default:
      return (...args) => {
        run.enter(args);
        return run.leave(run.original(...args), args);
      };
  }
}
