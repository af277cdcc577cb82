/**
 * A program to trace: compresses, decompresses and checksums buffers with zlib, as any program
 * using it would. Run it under the trace command to see where its native time goes:
 *
 *   deno run -A src/trace/cli.ts --library libz.so.1 --match 'crc32*,deflate*,inflate*,compress*,uncompress*' \
 *     --svg trace.svg -- examples/trace_zlib.ts
 *   bun src/trace/cli.ts --library libz.so.1 --match 'crc32*,deflate*,inflate*' -- examples/trace_zlib.ts
 *
 * (From JSR: `deno run -A jsr:@redefine/redefine/trace …`; from npm: `bunx redefine-trace …`.)
 * Run alone, it only does its work. Needs libz.so.1 (Debian: zlib1g).
 */
import { open } from "./ffi.ts";

const z = open("libz.so.1", {
  compress2: { parameters: ["buffer", "buffer", "buffer", "u64", "i32"], result: "i32" },
  uncompress: { parameters: ["buffer", "buffer", "buffer", "u64"], result: "i32" },
  crc32: { parameters: ["u64", "buffer", "u32"], result: "u64" },
});

const rounds = 50;
let compressedBytes = 0, plainBytes = 0;
for (let round = 0; round < rounds; round++) {
  const text = new TextEncoder().encode(
    Array.from({ length: 2000 }, (_, i) => `line ${i * round} of round ${round}: the quick brown fox\n`).join(""),
  );
  const packed = new Uint8Array(text.length + 1024);
  const packedLength = new BigUint64Array([BigInt(packed.length)]);
  if (z.compress2(packed, new Uint8Array(packedLength.buffer), text, BigInt(text.length), 6) !== 0) {
    throw new Error("compress2 failed");
  }
  const unpacked = new Uint8Array(text.length);
  const unpackedLength = new BigUint64Array([BigInt(unpacked.length)]);
  const status = z.uncompress(unpacked, new Uint8Array(unpackedLength.buffer), packed, packedLength[0]);
  if (status !== 0 || z.crc32(0n, unpacked, unpacked.length) !== z.crc32(0n, text, text.length)) {
    throw new Error("the round trip changed the data");
  }
  plainBytes += text.length;
  compressedBytes += Number(packedLength[0]);
}
console.log(`${rounds} buffers, ${plainBytes} bytes compressed to ${compressedBytes} and back, checksums equal`);
