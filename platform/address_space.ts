/**
 * The process's address space as a list of mappings, whatever system reported it: where free
 * gaps near an address can hold new code, and protection bits as text for messages.
 */
import type { Mapping } from "./types.ts";
import { PROT_EXEC, PROT_READ, PROT_WRITE } from "./types.ts";

/** How many places to try in one free gap, and how far apart. */
const GAP_TRIES = 16n;
const GAP_STEP = 1n << 20n;

/** A stack may grow down into this much space below it; never put code there. */
const STACK_GUARD = 1n << 24n;

/** `r-x` style, for messages. */
export function protectionText(protection: number): string {
  return (protection & PROT_READ ? "r" : "-") + (protection & PROT_WRITE ? "w" : "-") +
    (protection & PROT_EXEC ? "x" : "-");
}

/**
 * Free page-aligned places for `size` bytes whose every byte is within `reach` of `near`, nearest
 * first, at most `limit` of them. Gaps below a stack keep a margin for its growth.
 */
export function nearCandidates(
  mappings: readonly Mapping[],
  near: bigint,
  reach: bigint,
  size: bigint,
  pageSize: bigint,
  limit = Infinity,
): bigint[] {
  const bounds = { near, low: near > reach ? near - reach : pageSize * 16n, high: near + reach, size, pageSize };
  // Each gap gives its places nearest first, and so do the gaps below `near` taken downwards and
  // the others taken upwards: two streams already in order, merged without a sort (a sort of every
  // place in the address space, for memory wanted anywhere, was a millisecond of the first patch).
  const below: number[] = [], above: number[] = [];
  for (let i = 0; i <= mappings.length; i++) (gapBelow(mappings, i, bounds) ? below : above).push(i);
  below.reverse();
  const streams = [below, above].map((gaps) => ({ gaps, next: 0, places: [] as bigint[], at: 0 }));
  const head = (s: (typeof streams)[number]): bigint | null => {
    while (s.at === s.places.length && s.next < s.gaps.length) {
      s.places = gapPlaces(mappings, s.gaps[s.next++]!, bounds);
      s.at = 0;
    }
    return s.at < s.places.length ? s.places[s.at]! : null;
  };
  const distance = (a: bigint) => (a > near ? a - near : near - a);
  const found: bigint[] = [];
  while (found.length < limit) {
    const down = head(streams[0]!), up = head(streams[1]!);
    if (down === null && up === null) break;
    // Of two as near, the lower first.
    const takeDown = up === null || (down !== null && distance(down) <= distance(up));
    found.push(takeDown ? down! : up!);
    streams[takeDown ? 0 : 1]!.at++;
  }
  return found;
}

/** What `nearCandidates` looks for. */
interface Bounds {
  readonly near: bigint;
  readonly low: bigint;
  readonly high: bigint;
  readonly size: bigint;
  readonly pageSize: bigint;
}

/** The usable part of the free gap before `mappings[i]` (after the last one when `i` is their count). */
function gap(mappings: readonly Mapping[], i: number, { low, high, pageSize }: Bounds): { from: bigint; to: bigint } {
  const floor = (v: bigint) => v - v % pageSize;
  const gapStart = i === 0 ? pageSize * 16n : mappings[i - 1]!.end;
  let gapEnd = i === mappings.length ? 2n ** 47n : mappings[i]!.start;
  if (i < mappings.length && mappings[i]!.path === "[stack]") gapEnd -= STACK_GUARD;
  return { from: floor((gapStart > low ? gapStart : low) + pageSize - 1n), to: floor(gapEnd < high ? gapEnd : high) };
}

/** Whether that gap lies wholly below `near`: its places are then taken from its top down. */
function gapBelow(mappings: readonly Mapping[], i: number, bounds: Bounds): boolean {
  return gap(mappings, i, bounds).to <= bounds.near;
}

/**
 * The places in one gap, nearest to `near` first: the closest (its top when the gap lies below,
 * its bottom above), then a few more further away — part of a gap the maps show free may be taken
 * by something they do not show (qemu-user hides its own mappings from the guest's /proc/self/maps).
 */
function gapPlaces(mappings: readonly Mapping[], i: number, bounds: Bounds): bigint[] {
  const { near, size, pageSize } = bounds;
  const { from, to } = gap(mappings, i, bounds);
  if (to - from < size) return [];
  const below = to <= near;
  const first = below ? to - size : from >= near ? from : near - near % pageSize;
  const found: bigint[] = [];
  for (let k = 0n; k < GAP_TRIES; k++) {
    const at = below ? first - k * GAP_STEP : first + k * GAP_STEP;
    if (at < from || at + size > to) break;
    found.push(at);
  }
  return found;
}

/**
 * A free page-aligned place for `size` bytes far from the libraries (the lowest gap), for memory
 * that need not be near anything; 0n (the system's choice) when none is seen. The system's own
 * choice lies next to the libraries, in the near space that stubs need: qemu-user fills the gaps
 * beside them first.
 */
export function farPlace(mappings: readonly Mapping[], size: bigint, pageSize: bigint): bigint {
  // Nearest to 0 is the first place of the lowest gap that has one.
  return nearCandidates(mappings, 0n, 2n ** 62n, size, pageSize, 1)[0] ?? 0n;
}
