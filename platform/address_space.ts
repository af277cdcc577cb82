/**
 * The process's address space as a list of mappings, whatever system reported it: where free
 * gaps near an address can hold new code, and protection bits as text for messages.
 */
import type { Mapping } from "./types.ts";
import { ANYWHERE, PROT_EXEC, PROT_READ, PROT_WRITE } from "./types.ts";

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
 * A first patch asks this of a map of a hundred-odd lines before anything is compiled, where each
 * step costs: the work is in plain numbers (exact below 2^53; bigints in and out, since bigint
 * arithmetic costs about a microsecond an operation there under Bun), and only the gaps that give
 * the places returned are looked at, found from `near` by a binary search.
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
  // Gap i lies before mapping i. Those before the first mapping that starts above `near` lie
  // below it, those after that one above it; that one's own gap may be either.
  let first = 0;
  for (let top = mappings.length; first < top;) {
    const middle = Math.floor((first + top) / 2);
    if (mappings[middle]!.start > near) top = middle;
    else first = middle + 1;
  }
  const split = gapTo(mappings, first, bounds) <= at ? first + 1 : first;
  // Each gap gives its places nearest first, and so do the gaps below `near` taken downwards and
  // the others taken upwards: two streams already in order, merged without a sort.
  const down = { next: split - 1, step: -1, places: [] as number[], at: 0 };
  const up = { next: split, step: 1, places: [] as number[], at: 0 };
  const head = (s: typeof down): number => {
    while (s.at === s.places.length && s.next >= 0 && s.next <= mappings.length) {
      s.places = gapPlaces(mappings, s.next, bounds);
      s.next += s.step;
      s.at = 0;
    }
    return s.at < s.places.length ? s.places[s.at]! : -1;
  };
  const found: bigint[] = [];
  while (found.length < limit) {
    const lower = head(down), upper = head(up);
    if (lower < 0 && upper < 0) break;
    // Of two as near, the lower first.
    const takeLower = upper < 0 || (lower >= 0 && at - lower <= Math.abs(upper - at));
    found.push(BigInt(takeLower ? lower : upper));
    (takeLower ? down : up).at++;
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

/** Where the usable part of the free gap before `mappings[i]` ends (`i` their count: the last gap). */
function gapTo(mappings: readonly Mapping[], i: number, { high, page }: Bounds): number {
  let end = i === mappings.length ? TOP : Number(mappings[i]!.start);
  if (i < mappings.length && mappings[i]!.path === "[stack]") end -= STACK_GUARD;
  const to = Math.min(end, high);
  return to - to % page;
}

/**
 * The places in the gap before `mappings[i]`, nearest to `near` first: the closest (its top when
 * the gap lies below, its bottom above), then a few more further away — part of a gap the maps
 * show free may be taken by something they do not show (qemu-user hides its own mappings from the
 * guest's /proc/self/maps).
 */
function gapPlaces(mappings: readonly Mapping[], i: number, bounds: Bounds): number[] {
  const { near, low, size, page } = bounds;
  const start = Math.max(i === 0 ? page * 16 : Number(mappings[i - 1]!.end), low) + page - 1;
  const from = start - start % page;
  const to = gapTo(mappings, i, bounds);
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
  return nearCandidates(mappings, 0n, ANYWHERE, size, pageSize, 1)[0] ?? 0n;
}
