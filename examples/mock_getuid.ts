/**
 * Mocking a syscall wrapper for a test: the JS thread sees a made-up user id, while every other
 * thread — the runtime's own among them — keeps the real one (the guard stub sends calls from
 * other threads to the original).
 *
 *   deno run --allow-ffi examples/mock_getuid.ts
 *   bun examples/mock_getuid.ts
 *   node examples/mock_getuid.ts
 */
import { redefine } from "../mod.ts";
import { open } from "./ffi.ts";

const libc = open("libc.so.6", { getuid: { parameters: [], result: "u32" } });
const real = libc.getuid();
const fake = real === 0 ? 1000 : 0;
{
  using patch = redefine({ symbol: "getuid", library: "libc.so.6", parameters: [], result: "u32" }, () => fake);
  console.log(`mocked: getuid() = ${libc.getuid()}; the original says ${patch.original()}`);
}
console.log(`restored: getuid() = ${libc.getuid()} (real: ${real})`);
