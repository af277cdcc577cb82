/**
 * Perl's `Memoize`, for native code: a pure function is redefined by a JS function that answers
 * repeated questions from a cache and asks the original only once per question. Every caller of
 * the function goes through the cache, without being changed. Here the function is libm's `jn`, the
 * Bessel function of the first kind, whose cost grows with its order.
 *
 *   deno run --allow-ffi examples/memoize.ts
 *   bun examples/memoize.ts
 */
import { redefine } from "../mod.ts";
import { open } from "./ffi.ts";

const libm = open("libm.so.6", { jn: { parameters: ["i32", "f64"], result: "f64" } });

// A table of jn(n, x) for orders 0..19 at x = 0.5, 1, ..., 3, looked up 10 times over.
const questions: [number, number][] = [];
for (let pass = 0; pass < 10; pass++) {
  for (let n = 0; n < 20; n++) for (let x = 0.5; x <= 3; x += 0.5) questions.push([n, x]);
}

const cache = new Map<string, number>();
let hits = 0;
let misses = 0;
let memoized: number[];
{
  using patch = redefine(
    { symbol: "jn", library: "libm.so.6", parameters: ["i32", "f64"], result: "f64" },
    (n, x): number => {
      const key = `${n} ${x}`;
      const known = cache.get(key);
      if (known !== undefined) {
        hits++;
        return known;
      }
      misses++;
      const value: number = patch.original(n, x); // the real jn, through the trampoline
      cache.set(key, value);
      return value;
    },
  );
  memoized = questions.map(([n, x]) => libm.jn(n, x));
}
const calls = hits + misses;
console.log(
  `jn memoized: ${calls} calls, ${hits} answered from the cache (${(100 * hits / calls).toFixed(1)}% hit rate), ` +
    `${misses} reached libm`,
);
const real = questions.map(([n, x]) => libm.jn(n, x));
const same = real.every((value, i) => Object.is(value, memoized[i]));
console.log(same ? "every answer equals libm's own" : "some answers differ from libm's");
libm.jn(3, 1.5);
console.log(`restored: jn is libm's again (the cache saw ${hits + misses - calls} more calls)`);
