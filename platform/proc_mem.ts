/**
 * Writing code through /proc/self/mem (Linux): a `pwrite` at the address, which the kernel carries
 * out as a forced write, giving the process a private copy of a read-only page. No page becomes
 * writable, not even for a moment, no mapping splits, and it reaches the vDSO, which `mprotect`
 * refuses. Hardened kernels forbid it (`proc_mem.force_override=never`): the first write opens the
 * file and probes it on a page of its own, and that decides for the life of the process.
 */
import { hex } from "../src/errors.ts";
import type { NativeCall, Runtime, Store } from "./types.ts";
import { PROT_READ } from "./types.ts";
import { cString } from "./posix.ts";
import type { StoresInOrder } from "./stores_in_order.ts";

const O_RDWR = 2;
const O_CLOEXEC = 0x80000;
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const MAP_FAILED = 2n ** 64n - 1n;

/** The libc functions the writer calls, as platform/linux.ts bound them. */
export interface ProcMemLibc {
  readonly open: NativeCall;
  readonly close: NativeCall;
  readonly pwrite: NativeCall;
  readonly mmap: NativeCall;
  readonly munmap: NativeCall;
}

/** The writer of one process. */
export interface ProcMem {
  /** `Os.forceWrite`: true when every byte was written, false (nothing written) when refused. */
  write(address: bigint, bytes: Uint8Array): boolean;
  /**
   * `Os.storeInOrder`, forced: each of `stores` as `write` makes it, all by one call of `run`;
   * how many were made (0 also when the kernel refuses this process forced writes).
   */
  writeInOrder(stores: readonly Store[], run: StoresInOrder): number;
  /** Why the last write, or the probe, was refused; null while none was. */
  refusal(): string | null;
}

/** The writer over `c`; `errnoText` names an errno, by default the one a failed call left. */
export function procMem(runtime: Runtime, c: ProcMemLibc, pageSize: number, errnoText: (code?: number) => string): ProcMem {
  const page = BigInt(pageSize);
  // The descriptor once opened and probed; null when the kernel refuses the path to this process.
  let fd: number | null | undefined;
  let refusal: string | null = null;

  // /proc/self/mem takes file offsets as unsigned addresses; `pwrite` passes them as off_t.
  const pwrite = (bytes: Uint8Array, address: bigint) =>
    Number(c.pwrite(fd, bytes, BigInt(bytes.length), BigInt.asIntN(64, address)));

  function open(): number | null {
    const opened = c.open(cString("/proc/self/mem"), O_RDWR | O_CLOEXEC) as number;
    if (opened < 0) {
      refusal = `opening /proc/self/mem failed: ${errnoText()}`;
      return null;
    }
    fd = opened;
    // The probe: one byte into a read-only private page of our own, which only a forced write can
    // change. A failure here is the kernel's policy for the process, not a property of one target.
    const probe = c.mmap(0n, page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0n) as bigint;
    const written = probe !== MAP_FAILED && pwrite(Uint8Array.of(1), probe) === 1 &&
      runtime.view(probe, 1)[0] === 1;
    if (!written) refusal = `the kernel refuses this process forced writes (${errnoText()})`;
    if (probe !== MAP_FAILED) c.munmap(probe, page);
    if (written) return opened;
    c.close(opened);
    return null;
  }

  const refused = (address: bigint, length: number, why: string) =>
    (refusal = `the write of ${length} bytes at ${hex(address)} through /proc/self/mem was refused: ${why}`);

  return {
    write(address, bytes) {
      if (fd === undefined) fd = open();
      if (fd === null) return false;
      // Within one page the kernel takes all or nothing; across pages it may stop at a boundary.
      const before = Number(address % page) + bytes.length <= pageSize ? null : runtime.view(address, bytes.length).slice();
      const n = pwrite(bytes, address);
      if (n === bytes.length) return true;
      refused(address, bytes.length, n < 0 ? errnoText() : `the kernel took ${n}`);
      if (n > 0 && before) pwrite(before.subarray(0, n), address);
      return false;
    },
    writeInOrder(stores, run) {
      if (fd === undefined) fd = open();
      if (fd === null) return 0;
      const { made, result } = run(stores, fd);
      if (made < stores.length) {
        const { address, bytes } = stores[made]!;
        refused(address, bytes.length, result < 0 ? errnoText(-result) : `the kernel took ${result}`);
      }
      return made;
    },
    refusal: () => refusal,
  };
}
