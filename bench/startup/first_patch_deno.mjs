// The start-up benchmark's subject on Deno (bench/startup.bench.ts): what the package's Deno users
// load, dist/deno.js (scripts/build.mjs), imported; the first patch (a native redirect), restored.
import { redefine } from "../../dist/deno.js";

redefine({ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" }).restore();
