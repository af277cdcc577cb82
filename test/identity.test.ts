import { assert, runtimeName, runtimePath, test } from "./harness.ts";
import { execFileSync } from "node:child_process";
import { log } from "node:console";

test("identity hooks over all of libc, in a child process: runtime keeps working, code restored exactly", () => {
  const fixture = new URL("./fixtures/identity_libc.ts", import.meta.url).pathname;
  const bin = runtimePath;
  const args = runtimeName === "deno" ? ["run", "-A", "--no-check", fixture] : [fixture];
  const out = execFileSync(bin, args, { encoding: "utf8", timeout: 120_000 });
  const result = JSON.parse(out.trim().split("\n").at(-1)!);
  log(
    `identity hooks (${result.runtime}): ${result.functions} libc function names` +
      `${result.stride > 1 ? ` (every ${result.stride}th)` : ""}, ${result.hooked} hooked, ` +
      `refused ${JSON.stringify(result.refused)}`,
  );
  assert.equal(result.workload, true, "file I/O, timers, formatting and JSON worked with every hook live");
  assert.equal(result.identical, true, "libc's code is byte-identical after restoring");
  assert.ok(result.hooked > 1500 / result.stride, `most of libc was hooked (${result.hooked}, every ${result.stride}th)`);
  // What may be refused, and why: names only a compat version exports (dlsym cannot see them),
  // aliases of an already hooked body, bodies shorter than a jump, the vDSO, code other code jumps into.
  const allowed = ["SYMBOL_NOT_FOUND", "ALREADY_PATCHED", "FUNCTION_TOO_SHORT", "PROTECT_FAILED", "UNRELOCATABLE"];
  for (const code of Object.keys(result.refused)) assert.ok(allowed.includes(code), `${code}: ${result.examples[code]}`);
});
