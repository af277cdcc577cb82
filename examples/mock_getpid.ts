/**
 * Mocking a syscall wrapper for a test: the JS thread sees a fixed process id, while every other
 * thread — the runtime's own among them — keeps the real one (the guard stub sends calls from
 * other threads to the original).
 *
 *   deno run --allow-ffi examples/mock_getpid.ts
 *   bun examples/mock_getpid.ts
 */
import { redefine } from "../mod.ts";
import { open } from "./ffi.ts";

const libc = open("libc.so.6", { getpid: { parameters: [], result: "i32" } });
const real = libc.getpid();
{
  using patch = redefine({ symbol: "getpid", library: "libc.so.6", parameters: [], result: "i32" }, () => 4242);
  console.log(`mocked: getpid() = ${libc.getpid()}; the original says ${patch.original()}`);
}
console.log(`restored: getpid() = ${libc.getpid()} (real: ${real})`);
