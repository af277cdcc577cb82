/**
 * The reference disassembler for the aarch64 tests: GNU objdump for aarch64, run on the raw bytes
 * at a chosen address. Missing objdump fails the tests, never skips them.
 */
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { assert } from "./harness.ts";

const OBJDUMP = "aarch64-linux-gnu-objdump";

/** A 64-bit literal expected in the listing instead of the two words objdump would make of it. */
export interface Quad {
  quad: bigint;
}

function runObjdump(file: string, address: bigint): string {
  try {
    return execFileSync(
      OBJDUMP,
      // -z: zero words are `udf #0` to us, not a gap to elide.
      ["-D", "-z", "-b", "binary", "-m", "aarch64", `--adjust-vma=0x${address.toString(16)}`, file],
      { encoding: "utf8" },
    );
  } catch (error) {
    if ((error as { code?: string }).code === "ENOENT") {
      throw new Error(
        `${OBJDUMP} is not installed; the aarch64 tests check every word against it. Install it ` +
          "with: apt-get install -y binutils-aarch64-linux-gnu",
      );
    }
    throw error;
  }
}

/**
 * objdump's text for each word of `bytes` placed at `address`: "mnemonic operands", with
 * whitespace collapsed and its `//` comments dropped (branch targets are absolute addresses).
 */
export function disassemble(bytes: Uint8Array, address: bigint): string[] {
  const dir = mkdtempSync(join(tmpdir(), "redefine-objdump-"));
  try {
    const file = join(dir, "code.bin");
    writeFileSync(file, bytes);
    const lines: string[] = [];
    for (const line of runObjdump(file, address).split("\n")) {
      const match = /^\s*([0-9a-f]+):\t[0-9a-f]{8}\s+(.*)$/.exec(line);
      if (match === null) continue;
      assert.equal(BigInt("0x" + match[1]), address + BigInt(lines.length * 4), `objdump line: ${line}`);
      lines.push(match[2].replace(/\s*\/\/.*$/, "").replace(/\s+/g, " ").trim());
    }
    assert.equal(lines.length, bytes.length / 4, "objdump listed every word");
    return lines;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Asserts that `bytes` placed at `address` disassemble to `expected`, one entry per word, with
 * `{ quad }` standing for an 8-byte little-endian literal.
 */
export function assertDisassembly(
  bytes: Uint8Array,
  address: bigint,
  expected: readonly (string | Quad)[],
): void {
  const listing = disassemble(bytes, address);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const actual: string[] = [];
  for (let word = 0; word < listing.length; word++) {
    if (typeof expected[actual.length] === "object") {
      actual.push(`.quad 0x${view.getBigUint64(word * 4, true).toString(16)}`);
      word++;
    } else {
      actual.push(listing[word]);
    }
  }
  const wanted = expected.map((line) =>
    typeof line === "string" ? line : `.quad 0x${line.quad.toString(16)}`
  );
  assert.deepEqual(actual, wanted);
}

/** `0x` and lowercase hex, as objdump prints addresses and immediates. */
export function h(value: bigint | number): string {
  return "0x" + value.toString(16);
}
