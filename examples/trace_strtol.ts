/**
 * Tracing: log every call made to libc's `strtol` — here by libc's own `atoi`, which calls it inside libc —
 * then answer with the real function through `patch.original`.
 *
 *   deno run --allow-ffi examples/trace_strtol.ts
 *   bun examples/trace_strtol.ts
 *   node examples/trace_strtol.ts
 */
import { redefine } from "../mod.ts";
import { cstr, open, readCString } from "./ffi.ts";

const libc = open("libc.so.6", { atoi: { parameters: ["buffer"], result: "i32" } });
const calls: string[] = [];
{
  using patch = redefine(
    { symbol: "strtol", library: "libc.so.6", parameters: ["pointer", "pointer", "i32"], result: "i64" },
    (text, end, base): bigint => {
      const result = patch.original(text, end, base);
      calls.push(`strtol("${readCString(text)}", ${end === 0n ? "NULL" : "&end"}, ${base}) = ${result}`);
      return result;
    },
  );
  const sum = ["12", "30", "-2"].reduce((total, s) => total + libc.atoi(cstr(s)), 0);
  console.log(`atoi summed to ${sum}; libc called strtol ${calls.length} times:`);
}
for (const call of calls) console.log("  " + call);
