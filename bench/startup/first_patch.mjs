// The start-up benchmark's subject on Bun and Node (bench/startup.bench.ts): what the package's
// users load there, dist/mod.js (scripts/build.mjs), imported; the first patch (a native
// redirect), restored.
import { redefine } from "../../dist/mod.js";

redefine({ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" }).restore();
