import { probeNatively, clockRate } from "./src/trace/native_probe.ts";
import { platform } from "./platform/mod.ts";
const { runtime } = platform();
const libc = runtime.open("libc.so.6", { atoi: { parameters: ["buffer"], result: "i32" }, labs: { parameters: ["i64"], result: "i64" } });
const rate = clockRate();
console.log("ticks/ns", rate);
for (const timing of [false, true]) {
  const p = probeNatively({ symbol: "strtol", library: "libc.so.6" }, timing);
  const s = new TextEncoder().encode("123\0");
  let sum = 0;
  for (let i = 0; i < 1000; i++) sum += libc.atoi(s);
  console.log(timing, sum, p.read(), Number(p.read().ticks) / rate / Math.max(1, p.read().timed), "ns/call");
  p.restore();
  console.log(p.read(), libc.atoi(s));
}
