/**
 * Canned native replacements: `returns` and `sequence` answer calls with machine code of their
 * own, which never enters JS — so any thread may call the function, the runtime's included, and
 * the patch's `calls` counts every call natively. Here `getppid` returns 42 even to a native thread
 * started on it, and `rand` deals a fixed hand.
 *
 *   deno run --allow-ffi examples/canned.ts
 *   bun examples/canned.ts
 */
import { redefine, returns, sequence } from "../mod.ts";
import { open } from "./ffi.ts";

const libc = open("libc.so.6", {
  getppid: { parameters: [], result: "i32" },
  rand: { parameters: [], result: "i32" },
  pthread_create: { parameters: ["buffer", "u64", "u64", "u64"], result: "i32" },
  pthread_join: { parameters: ["u64", "buffer"], result: "i32" },
});

/** Starts a native thread on the function at `address` (its result is the thread's exit value) and joins it. */
function onNativeThread(address: bigint): number {
  const id = new BigUint64Array(1);
  const exit = new BigInt64Array(1);
  libc.pthread_create(new Uint8Array(id.buffer), 0n, address, 0n);
  libc.pthread_join(id[0], new Uint8Array(exit.buffer));
  return Number(BigInt.asIntN(32, exit[0]));
}

const parent = libc.getppid();
{
  using patch = redefine({ symbol: "getppid", library: "libc.so.6", parameters: [], result: "i32" }, returns(42));
  console.log(`returns(42): getppid() = ${libc.getppid()}; on a native thread: ${onNativeThread(patch.address)}`);
  console.log(`calls counted natively: ${patch.calls}`);
}
console.log(`restored: getppid() is the real parent again: ${libc.getppid() === parent}`);

{
  using patch = redefine({ symbol: "rand", library: "libc.so.6", parameters: [], result: "i32" }, sequence(4, 8, 15, 16, 23, 42));
  const hand = Array.from({ length: 8 }, () => libc.rand());
  console.log(`sequence(4, 8, 15, 16, 23, 42): rand() = ${hand.join(", ")} (the last repeats); calls = ${patch.calls}`);
}
