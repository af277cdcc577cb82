// The start-up benchmark's subject on Node (bench/startup.bench.ts): what the npm package's users
// run, dist/ (scripts/build.mjs), imported; the first patch (a native redirect), restored.
import { redefine } from "../../dist/mod.js";

redefine({ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" }).restore();
