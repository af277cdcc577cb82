/**
 * Which branches an arm64 Linux CPU checks, for `Os.branchChecks`: Branch Target Identification
 * (FEAT_BTI, `AT_HWCAP2` bit 17) makes an indirect branch into a PROT_BTI page fault unless it lands
 * on a landing pad, and glibc's loader (and the kernel, for the program) maps with PROT_BTI the text
 * of each image whose `PT_GNU_PROPERTY` note says BTI; the Guarded Control Stack (FEAT_GCS,
 * `AT_HWCAP` bit 32) checks returns once the process turned it on, which glibc does only when a
 * tunable asks (`glibc.cpu.aarch64_gcs`), and then locks: read once, by `prctl`.
 *
 * A page outside every loaded image (anonymous memory, a JIT's code) is taken as guarded on a CPU
 * with BTI: the memory map does not tell PROT_BTI (`/proc/self/smaps` does, as `bt`, but not under
 * qemu-user), and taking it as guarded only costs its trampolines a `ret` where a `br` would do.
 *
 * `mprotect` replaces PROT_BTI with the rest: the write that patches a page must ask for it again,
 * or the page stays unguarded for good. It is asked for an image built for BTI (whose text the
 * loader guarded, and whose every indirect target has a landing pad), never for anonymous memory,
 * which may not have been guarded.
 */
import type { BranchChecks, Mapping, Runtime } from "./types.ts";
import { PROT_EXEC, PROT_READ, UNCHECKED } from "./types.ts";
import { aarch64Features, imageAt } from "./image/elf_loaded.ts";

const AT_HWCAP = 16n;
const AT_HWCAP2 = 26n;
const HWCAP_GCS = 1n << 32n;
const HWCAP2_BTI = 1n << 17n;
const PR_GET_SHADOW_STACK_STATUS = 74;
const PR_SHADOW_STACK_ENABLE = 1n;
/** arm64's `PROT_BTI`. */
const PROT_BTI = 0x10;
/** `GNU_PROPERTY_AARCH64_FEATURE_1_BTI`. */
const FEATURE_BTI = 1;

/** What the Linux layer asks of BTI and GCS on arm64. */
export interface Aarch64BranchChecks {
  /** `Os.branchChecks`. */
  branchChecks(address: bigint): BranchChecks;
  /** `protection` for `mprotect` of pages from `address`: PROT_BTI added to guarded executable text. */
  protection(address: bigint, protection: number): number;
}

/**
 * BTI and GCS for arm64 Linux over `runtime`, with `mappingAt` to check each read against the
 * memory map. libc is bound at the first call: a process that patches nothing pays nothing.
 */
export function aarch64BranchChecks(
  runtime: Runtime,
  pageSize: number,
  mappingAt: (address: bigint) => Mapping | null,
): Aarch64BranchChecks {
  let known: { bti: boolean; gcs: boolean; dladdr: (address: bigint, info: Uint8Array) => number } | undefined;
  function cpu() {
    if (known) return known;
    const c = runtime.open("libc.so.6", {
      getauxval: { parameters: ["u64"], result: "u64" },
      prctl: { parameters: ["i32", "buffer", "u64", "u64", "u64"], result: "i32" },
      dladdr: { parameters: ["usize", "buffer"], result: "i32" },
    });
    const bti = ((c.getauxval(AT_HWCAP2) as bigint) & HWCAP2_BTI) !== 0n;
    let gcs = false;
    if (((c.getauxval(AT_HWCAP) as bigint) & HWCAP_GCS) !== 0n) {
      const status = new BigUint64Array(1);
      const asked = c.prctl(PR_GET_SHADOW_STACK_STATUS, new Uint8Array(status.buffer), 0n, 0n, 0n) as number;
      // A kernel that cannot tell may have it on: taken as on.
      gcs = asked !== 0 || (status[0]! & PR_SHADOW_STACK_ENABLE) !== 0n;
    }
    known = { bti, gcs, dladdr: (address, info) => c.dladdr(address, info) as number };
    return known;
  }

  /** Copies readable bytes, or throws (the image is not what its header says). */
  function read(address: bigint, length: number): Uint8Array {
    const mapping = mappingAt(address);
    if (!mapping || !(mapping.protection & PROT_READ) || address + BigInt(length) > mapping.end) {
      throw new RangeError(`${length} bytes at ${address} are not readable`);
    }
    return runtime.view(address, length).slice();
  }

  // What each image's note said, by where it is loaded and its name: every write of a patch asks
  // (arm64 writes go through mprotect), and an image's note does not change while it is loaded.
  const images = new Map<string, boolean | null>();

  /**
   * Whether the loaded image holding `address` was built for BTI; null when no image holds it, or
   * its headers cannot be read.
   */
  function builtForBti(address: bigint, dladdr: (address: bigint, info: Uint8Array) => number): boolean | null {
    // Dl_info: dli_fname, dli_fbase, dli_sname, dli_saddr.
    const info = new Uint8Array(32);
    if (dladdr(address, info) === 0) return null;
    const fields = new DataView(info.buffer);
    const base = fields.getBigUint64(8, true), name = fields.getBigUint64(0, true);
    const key = `${base}:${name === 0n ? "" : runtime.cString(name)}`;
    if (images.has(key)) return images.get(key)!;
    let built: boolean | null;
    try {
      built = (aarch64Features(read, imageAt(read, base, pageSize)) & FEATURE_BTI) !== 0;
    } catch (error) {
      if (!(error instanceof RangeError)) throw error;
      built = null;
    }
    images.set(key, built);
    return built;
  }

  return {
    branchChecks(address) {
      const { bti, gcs, dladdr } = cpu();
      if (!bti) return gcs ? { landingPads: false, shadowStack: true } : UNCHECKED;
      return { landingPads: builtForBti(address, dladdr) ?? true, shadowStack: gcs };
    },
    protection(address, protection) {
      if (!(protection & PROT_EXEC)) return protection;
      const { bti, dladdr } = cpu();
      return bti && builtForBti(address, dladdr) === true ? protection | PROT_BTI : protection;
    },
  };
}
