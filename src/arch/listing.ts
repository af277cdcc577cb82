/**
 * A tiny two-pass assembler for the hand-written listings (the guards): a listing is lines of
 * machine code with labels between them, and a line may compute its bytes from where it sits and
 * where the labels are. Offsets inside listings come from labels, not from counting by hand.
 */

/** Where a line sits, in bytes from the start of its listing, and where its labels are. */
export interface Place {
  /** The line's first byte: what AArch64 pc-relative operands count from. */
  readonly start: number;
  /** The byte after the line: what x86-64 rel32 and RIP-relative operands count from. */
  readonly end: number;
  /** Bytes in each number the listing's lines hold (1, or 4 for AArch64 words). */
  readonly unit: number;
  /** The offset of the label `name`. */
  label(name: string): number;
}

/**
 * One line: a label, fixed numbers (bytes or words), or numbers computed from their place. A
 * computed line must come out the same length wherever the labels land.
 */
export type Line = string | readonly number[] | ((place: Place) => readonly number[]);

/**
 * The bytes of `lines`, whose numbers are `unit` bytes each (little-endian), and the offsets of
 * their labels.
 *
 * @example
 * ```ts
 * import { assembleListing } from "./listing.ts";
 * const { bytes } = assembleListing([
 *   (place) => [0xeb, place.label("out") - place.end], // jmp short out
 *   [0x90], //                                            nop
 *   "out",
 *   [0xc3], //                                            ret
 * ]);
 * console.log(bytes); // Uint8Array(4) [ 235, 1, 144, 195 ]
 * ```
 */
export function assembleListing(
  lines: readonly Line[],
  unit: 1 | 4 = 1,
): { bytes: Uint8Array; labels: ReadonlyMap<string, number> } {
  const numbersOf = (line: Exclude<Line, string>, place: Place) => typeof line === "function" ? line(place) : line;
  // First pass, for the sizes and the labels: every label taken to be at the line asking for it,
  // a distance of 0, which any operand encodes.
  const labels = new Map<string, number>();
  const sizes: number[] = [];
  let size = 0;
  lines.forEach((line, i) => {
    if (typeof line === "string") {
      labels.set(line, size);
      return;
    }
    const start = size;
    sizes[i] = numbersOf(line, { start, end: start, unit, label: () => start }).length * unit;
    size += sizes[i];
  });
  const label = (name: string): number => {
    const offset = labels.get(name);
    if (offset === undefined) throw new RangeError(`the listing has no label '${name}'`);
    return offset;
  };
  const bytes = new Uint8Array(size);
  const view = new DataView(bytes.buffer);
  let start = 0;
  lines.forEach((line, i) => {
    if (typeof line === "string") return;
    const numbers = numbersOf(line, { start, end: start + sizes[i], unit, label });
    if (numbers.length * unit !== sizes[i]) throw new RangeError(`line ${i} of the listing changed its size`);
    numbers.forEach((n, k) => (unit === 1 ? view.setUint8(start + k, n) : view.setUint32(start + 4 * k, n, true)));
    start += sizes[i];
  });
  return { bytes, labels };
}

/**
 * Filler numbers up to the next multiple of `boundary` bytes: literals after the code are aligned.
 *
 * @example
 * ```ts
 * import { align, assembleListing } from "./listing.ts";
 * console.log(assembleListing([[0xc3], align(4, 0xcc)]).bytes); // Uint8Array(4) [ 195, 204, 204, 204 ]
 * ```
 */
export function align(boundary: number, filler: number): Line {
  return (place) => new Array(((boundary - place.start % boundary) % boundary) / place.unit).fill(filler);
}
