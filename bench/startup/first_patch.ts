// The start-up benchmark's subject (bench/startup.bench.ts): import redefine, make the first patch
// (a native redirect) and restore it.
import { redefine } from "../../mod.ts";

redefine({ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" }).restore();
