/** The label assembler of the guard listings: labels, places, words, and its refusals. */
import { assert, test } from "./harness.ts";
import { align, assembleListing } from "../src/arch/listing.ts";

test("listing: labels before and after a line, x86-64 distances from the end of the line", () => {
  const { bytes, labels } = assembleListing([
    "top",
    (p) => [0x74, p.label("out") - p.end], // je out
    [0x90], //                                nop
    (p) => [0xeb, (p.label("top") - p.end) & 0xff], // jmp top
    "out",
    [0xc3], //                                ret
  ]);
  assert.deepEqual([...bytes], [0x74, 0x03, 0x90, 0xeb, 0xfb, 0xc3]);
  assert.deepEqual([...labels], [["top", 0], ["out", 5]]);
});

test("listing: AArch64 words little-endian, distances from the start, literals aligned", () => {
  const { bytes, labels } = assembleListing([
    (p) => [0x58000000 | (((p.label("literal") - p.start) / 4) << 5)], // ldr x0, literal
    align(8, 0xd503201f), //                                               nop
    "literal",
    [0x89abcdef, 0x01234567],
  ], 4);
  assert.equal(labels.get("literal"), 8);
  assert.deepEqual([...bytes.subarray(0, 8)], [0x40, 0x00, 0x00, 0x58, 0x1f, 0x20, 0x03, 0xd5]);
  assert.equal(new DataView(bytes.buffer).getBigUint64(8, true), 0x0123456789abcdefn);
});

test("listing: a missing label and a line whose size depends on a label are refused", () => {
  assert.throws(() => assembleListing([(p) => [p.label("nowhere")]]), /no label 'nowhere'/);
  assert.throws(
    () => assembleListing([(p) => new Array(p.label("end") - p.start + 1).fill(0x90), "end"]),
    /changed its size/,
  );
});
