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
 * first. Gaps below a stack keep a margin for its growth.
 */
export function nearCandidates(
  mappings: readonly Mapping[],
  near: bigint,
  reach: bigint,
  size: bigint,
  pageSize: bigint,
): bigint[] {
  const distance = (a: bigint) => (a > near ? a - near : near - a);
  return places(mappings, near, reach, size, pageSize, Infinity)
    .sort((a, b) => (distance(a) < distance(b) ? -1 : distance(a) > distance(b) ? 1 : 0));
}

/**
 * The places `nearCandidates` sorts, gap by gap in address order (the order of `mappings`), the
 * first `limit` of them.
 */
function places(
  mappings: readonly Mapping[],
  near: bigint,
  reach: bigint,
  size: bigint,
  pageSize: bigint,
  limit: number,
): bigint[] {
  const found: bigint[] = [];
  const low = near > reach ? near - reach : pageSize * 16n;
  const high = near + reach;
  const floor = (v: bigint) => v - v % pageSize;
  const ceil = (v: bigint) => floor(v + pageSize - 1n);
  for (let i = 0; i <= mappings.length; i++) {
    const gapStart = i === 0 ? pageSize * 16n : mappings[i - 1]!.end;
    let gapEnd = i === mappings.length ? 2n ** 47n : mappings[i]!.start;
    if (i < mappings.length && mappings[i]!.path === "[stack]") gapEnd -= STACK_GUARD;
    const from = ceil(gapStart > low ? gapStart : low);
    const to = floor(gapEnd < high ? gapEnd : high);
    if (to - from < size) continue;
    // The place in this gap closest to `near` (its top when the gap lies below, its bottom above),
    // then a few more further away: part of a gap the maps show free may be taken by something
    // they do not show (qemu-user hides its own mappings from the guest's /proc/self/maps).
    const below = to <= near;
    const first = below ? to - size : from >= near ? from : floor(near);
    for (let k = 0n; k < GAP_TRIES; k++) {
      const at = below ? first - k * GAP_STEP : first + k * GAP_STEP;
      if (at < from || at + size > to) break;
      found.push(at);
      if (found.length === limit) return found;
    }
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
  // Nearest to 0 is the first place of the lowest gap that has one: nothing to sort.
  return places(mappings, 0n, 2n ** 62n, size, pageSize, 1)[0] ?? 0n;
}
