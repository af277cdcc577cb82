/**
 * arm64 Branch Target Identification: an indirect branch into a guarded page (PROT_BTI, what
 * glibc's loader gives the text of libraries built with `-mbranch-protection=standard`) must land
 * on a landing pad, else SIGILL. A trampoline farther than `b` reaches from the function jumps
 * back into its middle, where none is: it must get there by a branch BTI does not check. Run for
 * real in child processes (test/fixtures/bti.ts) on CPUs with BTI (qemu-user's `neoverse-n2` and
 * `max` honour PROT_BTI); elsewhere skipped. The detection (the CPU's hwcaps, an image's
 * `PT_GNU_PROPERTY` note) is checked here too.
 */
import { assert, test } from "./harness.ts";
import { runCase, spawnCase } from "./cases.ts";
import { assemble, isArm64, os, runtime, unassemble, words } from "./native.ts";
import { aarch64Features, imageAt } from "../platform/image/elf_loaded.ts";
import { propertyNote } from "./bti_library.ts";

const fixture = new URL("./fixtures/bti.ts", import.meta.url);
const AT_HWCAP2 = 26n;
const HWCAP2_BTI = 1n << 17n;

/** Whether this CPU (and kernel) has BTI: only then can a page be guarded. */
function hasBti(): boolean {
  if (!isArm64 || runtime.os !== "linux") return false;
  const c = runtime.open("libc.so.6", { getauxval: { parameters: ["u64"], result: "u64" } });
  return ((c.getauxval(AT_HWCAP2) as bigint) & HWCAP2_BTI) !== 0n;
}
const bti = hasBti();
const needsBti = { skip: bti ? undefined : "no BTI on this CPU (qemu-user: QEMU_CPU=neoverse-n2 has it)" };

/** What each case of the fixture calls, and what the calls must give. */
const CASES: Record<string, Record<string, unknown>> = {
  "JS replacement": { replaced: "-70n", original: "7n" },
  "native redirect": { replaced: "4242n", original: "7n" },
  "native probe": { replaced: "7n", original: "9n", calls: 2 },
  "to its original": { replaced: "7n", original: "9n" },
};

for (const [kind, expected] of Object.entries(CASES)) {
  test(`BTI: a guarded function with its trampoline beyond b's reach (${kind}): the original runs, no SIGILL`, () => {
    assert.deepEqual(runCase(fixture, kind), { far: true, ...expected, restored: true, after: "7n" });
  }, needsBti);
}

test("BTI: a library built for BTI (the loader guards its text): patched with its trampoline beyond b's reach, the original runs", () => {
  assert.deepEqual(runCase(fixture, "library built for BTI"), {
    checks: { landingPads: true, shadowStack: false },
    far: true,
    replaced: "-70n",
    original: "7n",
    restored: true,
    after: "7n",
  });
}, needsBti);

test("BTI: a library's page stays guarded after a patch and its restore (mprotect keeps PROT_BTI)", () => {
  // A branch past the landing pad faults before any patch (the page is guarded) and after one.
  for (const name of ["library built for BTI, past the pad", "library built for BTI, past the pad after a patch"]) {
    const child = spawnCase(fixture, name);
    const output = `${child.stdout ?? ""}${child.stderr ?? ""}`.slice(-2000);
    assert.equal(child.signal, "SIGILL", `${name}: ${output}`);
  }
}, needsBti);

test("BTI: Os.branchChecks guards anonymous code, and an image as its PT_GNU_PROPERTY note says", () => {
  const checks = os.branchChecks!;
  const { address, base } = assemble(words(0xd65f03c0)); // ret
  try {
    assert.deepEqual(checks(address), { landingPads: true, shadowStack: false }, "anonymous code: taken as guarded");
  } finally {
    unassemble(base);
  }
  const labs = os.symbolAddress("labs", "libc.so.6");
  const libc = os.modules().find((m) => labs >= m.base && labs < m.base + BigInt(m.size))!;
  const read = (at: bigint, length: number) => runtime.view(at, length).slice();
  const marked = (aarch64Features(read, imageAt(read, libc.base, os.pageSize)) & 1) !== 0;
  // Debian's arm64 libc (qemu's sysroot here) is built without BTI; Fedora's and Ubuntu's with it.
  assert.equal(checks(labs).landingPads, marked, `${libc.path}: ${marked ? "" : "not "}built for BTI`);
  assert.equal(checks(labs).shadowStack, false, "glibc turns the GCS on only when a tunable asks");
}, needsBti);

test("BTI: Os.branchChecks checks nothing on a CPU without BTI", () => {
  const checks = os.branchChecks?.(os.symbolAddress("labs", "libc.so.6"));
  assert.deepEqual(checks ?? { landingPads: false, shadowStack: false }, { landingPads: false, shadowStack: false });
}, { skip: bti ? "this CPU has BTI" : undefined });

/**
 * A little ELF image in memory: the header, two program headers, and a property note with
 * `features`, of which the PT_GNU_PROPERTY header gives `noteLength` bytes (all of it by default).
 */
function imageWithNote(features: number | null, noteLength?: number): { read: (address: bigint, length: number) => Uint8Array; base: bigint } {
  const base = 0x40_0000n;
  const bytes = new Uint8Array(0x200);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(32, 64n, true); //                  e_phoff
  view.setUint16(56, 2, true); //                       e_phnum
  const phdr = (i: number, type: number, vaddr: number, size: number) => {
    view.setUint32(64 + i * 56, type, true);
    view.setBigUint64(64 + i * 56 + 16, BigInt(vaddr), true);
    view.setBigUint64(64 + i * 56 + 40, BigInt(size), true);
  };
  phdr(0, 1, 0, bytes.length); //                       PT_LOAD of the whole image
  // A note with an x86 property first (another type, skipped), then the AArch64 one.
  const note = 0x100;
  const properties: [number, number][] = [[0xc0010001, 0xffff]]; // GNU_PROPERTY_X86_ISA_1_NEEDED-like
  if (features !== null) properties.push([0xc0000000, features]); // GNU_PROPERTY_AARCH64_FEATURE_1_AND
  const notes = propertyNote(properties);
  bytes.set(notes, note);
  phdr(1, 0x6474e553, note, noteLength ?? notes.length); // PT_GNU_PROPERTY
  const read = (address: bigint, length: number) => {
    const at = Number(address - base);
    if (at < 0 || at + length > bytes.length) throw new RangeError("outside the image");
    return bytes.slice(at, at + length);
  };
  return { read, base };
}

test("BTI: an image's PT_GNU_PROPERTY note gives its AArch64 features (BTI 1, PAC 2), 0 without one", () => {
  for (const [features, expected] of [[3, 3], [1, 1], [0, 0], [null, 0]] as const) {
    const { read, base } = imageWithNote(features);
    const image = imageAt(read, base, 4096);
    assert.equal(image.bias, base);
    assert.equal(aarch64Features(read, image), expected);
  }
});

test("BTI: a property note cut short inside its name or a property gives no features, and no RangeError", () => {
  for (const length of [12, 14, 16, 24, 36]) {
    const { read, base } = imageWithNote(3, length);
    assert.equal(aarch64Features(read, imageAt(read, base, 4096)), 0, `a note of ${length} bytes`);
  }
});
