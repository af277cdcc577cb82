/**
 * The demo: redefine libc's `strtol` so that every number is read as hexadecimal, and watch a real
 * native caller — libc's own `atoi`, which calls `strtol` inside libc — change its answers. Then
 * restore, and `atoi` is decimal again.
 *
 *   deno run --allow-ffi examples/hex_atoi.ts
 *   bun examples/hex_atoi.ts
 *   node examples/hex_atoi.ts
 */
import { redefine } from "../mod.ts";
import { cstr, open, readCString } from "./ffi.ts";

const libc = open("libc.so.6", { atoi: { parameters: ["buffer"], result: "i32" } });
const inputs = ["10", "ff", "7fff"];
const show = (when: string) =>
  console.log(`${when.padEnd(26)} ${inputs.map((s) => `atoi("${s}") = ${libc.atoi(cstr(s))}`).join(", ")}`);

show("libc as shipped:");
{
  using patch = redefine(
    { symbol: "strtol", library: "libc.so.6", parameters: ["pointer", "pointer", "i32"], result: "i64" },
    (text) => BigInt(parseInt(readCString(text), 16) || 0),
  );
  console.log(`strtol redefined: a jump written at 0x${patch.address.toString(16)}`);
  show("strtol redefined (hex):");
} // `using`: restored here, byte for byte
show("restored:");
