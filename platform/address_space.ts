/**
 * The process's address space as a list of mappings, whatever system reported it: where free
 * gaps near an address can hold new code, and protection bits as text for messages.
 */
import type { Mapping } from "./types.ts";
import { PROT_EXEC, PROT_READ, PROT_WRITE } from "./types.ts";

/** How many places to try in one free gap, and how far apart. */
const GAP_TRIES = 16;
const GAP_STEP = 2 ** 20;

/** A stack may grow down into this much space below it; never put code there. */
const STACK_GUARD = 2 ** 24;

/** Where the last gap ends: the top of x86-64's user space. */
const TOP = 2 ** 47;

/**
 * No place is sought above this: below it every integer is exact as a double (a process's
 * addresses all are; only x86-64's vsyscall page lies higher).
 */
const EXACT = 2 ** 53;

/** `r-x` style, for messages. */
export function protectionText(protection: number): string {
  return (protection & PROT_READ ? "r" : "-") + (protection & PROT_WRITE ? "w" : "-") +
    (protection & PROT_EXEC ? "x" : "-");
}

/**
 * Free page-aligned places for `size` bytes whose every byte is within `reach` of `near`, nearest
 * first, at most `limit` of them. Gaps below a stack keep a margin for its growth.
 *
 * Worked out in plain numbers, exact below 2^53, and given back as bigints: bigint arithmetic in
 * code not yet compiled costs about a microsecond an operation (Bun), and a first patch walks every
 * gap of the map twice (a millisecond or two of it, in bigints).
 */
export function nearCandidates(
  mappings: readonly Mapping[],
  near: bigint,
  reach: bigint,
  size: bigint,
  pageSize: bigint,
  limit = Infinity,
): bigint[] {
  const page = Number(pageSize);
  const at = Number(near);
  const bounds: Bounds = {
    near: at,
    low: near > reach ? at - Number(reach) : page * 16,
    high: Math.min(at + Number(reach), EXACT),
    size: Number(size),
    page,
  };
  // Each gap gives its places nearest first, and so do the gaps below `near` taken downwards and
  // the others taken upwards: two streams already in order, merged without a sort.
  const below: number[] = [], above: number[] = [];
  for (let i = 0; i <= mappings.length; i++) (gap(mappings, i, bounds).to <= at ? below : above).push(i);
  below.reverse();
  const streams = [below, above].map((gaps) => ({ gaps, next: 0, places: [] as number[], at: 0 }));
  const head = (s: (typeof streams)[number]): number => {
    while (s.at === s.places.length && s.next < s.gaps.length) {
      s.places = gapPlaces(mappings, s.gaps[s.next++]!, bounds);
      s.at = 0;
    }
    return s.at < s.places.length ? s.places[s.at]! : -1;
  };
  const found: bigint[] = [];
  while (found.length < limit) {
    const down = head(streams[0]!), up = head(streams[1]!);
    if (down < 0 && up < 0) break;
    // Of two as near, the lower first.
    const takeDown = up < 0 || (down >= 0 && at - down <= Math.abs(up - at));
    found.push(BigInt(takeDown ? down : up));
    streams[takeDown ? 0 : 1]!.at++;
  }
  return found;
}

/** What `nearCandidates` looks for, in numbers. */
interface Bounds {
  readonly near: number;
  readonly low: number;
  readonly high: number;
  readonly size: number;
  readonly page: number;
}

/** The usable part of the free gap before `mappings[i]` (after the last one when `i` is their count). */
function gap(mappings: readonly Mapping[], i: number, { low, high, page }: Bounds): { from: number; to: number } {
  const gapStart = i === 0 ? page * 16 : Number(mappings[i - 1]!.end);
  let gapEnd = i === mappings.length ? TOP : Number(mappings[i]!.start);
  if (i < mappings.length && mappings[i]!.path === "[stack]") gapEnd -= STACK_GUARD;
  const from = Math.max(gapStart, low) + page - 1;
  const to = Math.min(gapEnd, high);
  return { from: from - from % page, to: to - to % page };
}

/**
 * The places in one gap, nearest to `near` first: the closest (its top when the gap lies below,
 * its bottom above), then a few more further away — part of a gap the maps show free may be taken
 * by something they do not show (qemu-user hides its own mappings from the guest's /proc/self/maps).
 */
function gapPlaces(mappings: readonly Mapping[], i: number, bounds: Bounds): number[] {
  const { near, size, page } = bounds;
  const { from, to } = gap(mappings, i, bounds);
  if (to - from < size) return [];
  const below = to <= near;
  const first = below ? to - size : from >= near ? from : near - near % page;
  const found: number[] = [];
  for (let k = 0; k < GAP_TRIES; k++) {
    const place = below ? first - k * GAP_STEP : first + k * GAP_STEP;
    if (place < from || place + size > to) break;
    found.push(place);
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
