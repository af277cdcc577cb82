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
import { RedefineError } from "../src/errors.ts";
import type { BranchChecks, NativeCall, Runtime } from "./types.ts";
import { PROT_EXEC, UNCHECKED } from "./types.ts";
import { aarch64Features, imageAt } from "./image/elf_loaded.ts";
import type { Reader } from "./image/elf_loaded.ts";

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

/** The libc functions the checks call: the Linux layer's, bound when first called. */
type Libc = Record<"getauxval" | "prctl" | "dladdr1", NativeCall>;

/** What the Linux layer asks of BTI and GCS on arm64. */
export interface Aarch64BranchChecks {
  /** `Os.branchChecks`. */
  branchChecks(address: bigint): BranchChecks;
  /** `protection` for `mprotect` of pages from `address`: PROT_BTI added to guarded executable text. */
  protection(address: bigint, protection: number): number;
}

/**
 * BTI and GCS for arm64 Linux through the Linux layer's libc `c`, reading each image's headers
 * with a fresh `reader()` (checked against the memory map). Nothing is called before the first
 * ask: a process that patches nothing pays nothing.
 */
export function aarch64BranchChecks(
  runtime: Runtime,
  c: Libc,
  pageSize: number,
  reader: () => Reader,
): Aarch64BranchChecks {
  let known: { bti: boolean; gcs: boolean } | undefined;
  function cpu(): { bti: boolean; gcs: boolean } {
    if (known) return known;
    const bti = ((c.getauxval(AT_HWCAP2) as bigint) & HWCAP2_BTI) !== 0n;
    let gcs = false;
    if (((c.getauxval(AT_HWCAP) as bigint) & HWCAP_GCS) !== 0n) {
      const status = new BigUint64Array(1);
      const asked = c.prctl(PR_GET_SHADOW_STACK_STATUS, new Uint8Array(status.buffer), 0n, 0n, 0n) as number;
      // A kernel that cannot tell may have it on: taken as on.
      gcs = asked !== 0 || (status[0]! & PR_SHADOW_STACK_ENABLE) !== 0n;
    }
    known = { bti, gcs };
    return known;
  }

  // What each image's note said, by where it is loaded and its name: every write of a patch asks
  // (arm64 writes go through mprotect), and an image's note does not change while it is loaded.
  const images = new Map<string, boolean | null>();
  // Dl_info: dli_fname, dli_fbase, dli_sname, dli_saddr; `dladdr1`'s extra answer is not asked for.
  const info = new Uint8Array(32);
  const fields = new DataView(info.buffer);
  const unasked = new Uint8Array(8);

  /**
   * Whether the loaded image holding `address` was built for BTI; null when no image holds it, or
   * its headers cannot be read.
   */
  function builtForBti(address: bigint): boolean | null {
    if ((c.dladdr1(address, info, unasked, 0) as number) === 0) return null;
    const base = fields.getBigUint64(8, true), name = fields.getBigUint64(0, true);
    const key = `${base}:${name === 0n ? "" : runtime.cString(name)}`;
    if (images.has(key)) return images.get(key)!;
    let built: boolean | null;
    try {
      const read = reader();
      built = (aarch64Features(read, imageAt(read, base, pageSize)) & FEATURE_BTI) !== 0;
    } catch (error) {
      // INVALID_ADDRESS: the headers are not where the image says.
      if (!(error instanceof RedefineError)) throw error;
      built = null;
    }
    images.set(key, built);
    return built;
  }

  return {
    branchChecks(address) {
      const { bti, gcs } = cpu();
      if (!bti) return gcs ? { landingPads: false, shadowStack: true } : UNCHECKED;
      return { landingPads: builtForBti(address) ?? true, shadowStack: gcs };
    },
    protection(address, protection) {
      if (!(protection & PROT_EXEC)) return protection;
      return cpu().bti && builtForBti(address) === true ? protection | PROT_BTI : protection;
    },
  };
}
