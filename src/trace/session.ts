/**
 * One trace: `startTrace()` loads the libraries the options name, puts a native probe in front of
 * every exported function their globs match (or in the import slots of the `callers`), adds a JS
 * probe that logs each call of the functions given a signature, and keeps what it could not trace
 * with the reason. `results()` reads the probes; `stop()` takes them all off, newest first.
 */
import { exports, imports } from "../introspect.ts";
import type { ModuleExport } from "../introspect.ts";
import { machine } from "../registry.ts";
import { RedefineError } from "../errors.ts";
import type { NativeType } from "../signature.ts";
import { attach } from "./attach.ts";
import type { Probe } from "./attach.ts";
import { probeNatively } from "./native_probe.ts";
import type { NativeProbe, ProbeTarget } from "./native_probe.ts";
import { globMatches } from "./options.ts";
import type { SignatureOption, TraceOptions } from "./options.ts";
import type { FunctionResult, Refusal, TraceResult } from "./report.ts";

/**
 * Functions whose return address must not be swapped, counted but never timed: they return twice
 * (the saved context would hold the probe's exit, and a later return through it would find another
 * call's address), are entered with no return address on the stack, unwind through their callers,
 * or read their return address to learn who called (glibc's dlopen and dlsym pick the caller's
 * namespace and RTLD_NEXT that way).
 */
const COUNT_ONLY = new RegExp(
  "^(_*(sig)?setjmp|__sigsetjmp|_*longjmp|__longjmp_chk|siglongjmp|vfork|__vfork|getcontext|setcontext|" +
    "swapcontext|makecontext|__restore_rt|_*clone\\d*|_Unwind_\\w+|__cxa_throw|__cxa_rethrow|" +
    "dlopen|dlmopen|dlsym|dlvsym|__libc_dl\\w+)$",
);

/** A function with a native probe. */
interface Traced {
  readonly library: string;
  readonly name: string;
  readonly address: bigint;
  readonly timing: boolean;
  readonly probe: NativeProbe;
}

/** A running trace. */
export interface Session {
  /** Calls counted so far, over every probe. */
  calls(): number;
  /** What the probes have seen, with `ticksPerNs` to turn ticks into time (null: none timed). */
  results(ticksPerNs: number | null, wallNs: number): TraceResult;
  /**
   * Takes every probe off (JS probes first, then the native ones, newest first); returns why any
   * stayed (its entry rewritten by something else since: left as that left it).
   */
  stop(): string[];
}

/** Starts tracing what `options` asks for; `log` receives the signature probes' lines. */
export function startTrace(options: TraceOptions, log: (line: string) => void): Session {
  const traced: Traced[] = [];
  const refused: Refusal[] = [];
  const logging: Probe<readonly NativeType[], NativeType>[] = [];
  const byAddress = new Set<bigint>();
  const refuse = (library: string, name: string, error: unknown) => {
    if (!(error instanceof RedefineError)) throw error;
    refused.push({ library, name, code: error.code, reason: error.message });
  };
  const callerImports = options.callers.map((caller) => ({ caller, names: importedNames(caller, refuse) }));

  const trace = (library: string, e: ModuleExport) => {
    if (byAddress.has(e.address)) return;
    const callers = callerImports.filter((c) => c.names.has(e.name)).map((c) => c.caller);
    if (options.callers.length && callers.length === 0) return; // none of the callers calls it
    const timing = !options.countOnly && !COUNT_ONLY.test(e.name);
    const target: ProbeTarget = callers.length
      ? { symbol: e.name, library, callers }
      : e.size > 0
      ? { address: e.address, size: e.size }
      : { symbol: e.name, library };
    try {
      traced.push({ library, name: e.name, address: e.address, timing, probe: probeNatively(target, timing) });
      byAddress.add(e.address);
    } catch (error) {
      refuse(library, e.name, error);
    }
  };

  const exported = new Map<string, ModuleExport[]>();
  for (const { library, match } of options.libraries) {
    const functions = load(library, refuse);
    if (!functions) continue;
    exported.set(library, functions);
    for (const e of publicNames(functions.filter((f) => match.some((glob) => globMatches(glob, f.name))))) {
      trace(library, e);
    }
  }
  for (const s of options.signatures) {
    // Counted and timed natively too, in the traced library that exports it (if one does).
    const [library, e] = [...exported].map(([l, functions]) => [l, functions.find((f) => f.name === s.symbol)] as const)
      .find(([, found]) => found) ?? [undefined, undefined];
    if (library !== undefined && e) trace(library, e);
    try {
      logging.push(logCalls(s, library, options.callers, log));
    } catch (error) {
      refuse(library ?? "(any library)", s.symbol, error);
    }
  }

  return {
    calls: () => traced.reduce((n, t) => n + t.probe.read().calls, 0),
    results(ticksPerNs: number | null, wallNs: number): TraceResult {
      const functions: FunctionResult[] = traced.map((t) => {
        const { calls, timed, ticks } = t.probe.read();
        const totalNs = ticksPerNs ? Number(ticks) / ticksPerNs : 0;
        return { library: t.library, name: t.name, address: t.address, calls, timed, totalNs, timing: t.timing };
      });
      return { runtime: machine().platform.runtime.name, ticksPerNs, wallNs, functions, refused };
    },
    stop() {
      const stayed: string[] = [];
      const restore = (off: () => void) => {
        try {
          off();
        } catch (error) {
          if (!(error instanceof RedefineError)) throw error;
          stayed.push(error.message);
        }
      };
      for (const p of [...logging].reverse()) restore(() => p.restore());
      for (const t of [...traced].reverse()) restore(() => t.probe.restore());
      return stayed;
    },
  };
}

/**
 * Loads `library`, for good: the loader's symbol lookup opens it first (and never closes it), so
 * looking up a name it does not define does it on every system and runtime.
 */
function loadLibrary(library: string): void {
  try {
    machine().platform.os.symbolAddress("redefine trace: load only", library);
  } catch (error) {
    if (!(error instanceof RedefineError) || error.code !== "SYMBOL_NOT_FOUND") throw error;
  }
}

/** Loads `library` (a no-op when loaded) and lists its exported functions; null when it cannot. */
function load(library: string, refuse: (library: string, name: string, error: unknown) => void): ModuleExport[] | null {
  try {
    loadLibrary(library);
    return exports(library).filter((e) => e.kind === "function" && e.default);
  } catch (error) {
    refuse(library, "*", error);
    return null;
  }
}

/** The names `caller` imports; none when it is not loaded (and why, in the refusals). */
function importedNames(caller: string, refuse: (library: string, name: string, error: unknown) => void): Set<string> {
  try {
    loadLibrary(caller);
    return new Set(imports(caller).map((i) => i.name));
  } catch (error) {
    refuse(caller, "*", error);
    return new Set();
  }
}

/**
 * One export per address: aliases (glibc's `getpid` and `__getpid`) share their code, which takes
 * one probe, named by the public name (fewest leading underscores, then shortest).
 */
function publicNames(functions: ModuleExport[]): ModuleExport[] {
  const best = new Map<bigint, ModuleExport>();
  const rank = (e: ModuleExport) => /^_*/.exec(e.name)![0].length * 1000 + e.name.length;
  for (const e of functions) {
    const known = best.get(e.address);
    if (!known || rank(e) < rank(known) || (rank(e) === rank(known) && e.name < known.name)) best.set(e.address, e);
  }
  return [...best.values()];
}

/** A JS probe logging every call of `s` with its arguments and result. */
function logCalls(
  s: SignatureOption,
  library: string | undefined,
  callers: readonly string[],
  log: (line: string) => void,
): Probe<readonly NativeType[], NativeType> {
  const target = {
    symbol: s.symbol,
    parameters: s.parameters,
    result: s.result,
    ...(library !== undefined ? { library } : {}),
    ...(callers.length ? { callers } : {}),
  };
  return attach(target, {
    onLeave(result: unknown, args: unknown[]) {
      const shown = s.result === "void" ? "" : ` = ${show(result, s.result)}`;
      log(`${s.symbol}(${args.map((a, i) => show(a, s.parameters[i])).join(", ")})${shown}`);
    },
  } as never) as Probe<readonly NativeType[], NativeType>;
}

/** A value as a log line shows it: pointers in hex, numbers as they are. */
function show(value: unknown, type: NativeType): string {
  if (typeof value === "bigint" && (type === "pointer" || type === "buffer" || type === "function")) {
    return `0x${value.toString(16)}`;
  }
  return String(value);
}
