// `npm run test:arm64`: the whole test suite on Linux arm64, emulated by qemu-user on this x86-64
// machine, for Deno and for Bun, plus the Deno suite once more with 16 KiB pages and the BTI tests
// on a CPU with BTI. Sets up what it needs first and skips what is already there: Debian's qemu
// and arm64 libc, a qemu recent enough to honour instruction-cache flushes (see `modernQemu`), the
// arm64 libsqlite3 and zlib that some tests use (see `sysroot`), the arm64 Deno and Bun of the same
// versions as the x86-64 devDependencies (from npm), and binfmt_misc so that tests can start arm64
// child processes.
// Closes with one line: "N passed, N failed, N skipped".
//
// Arguments pick steps by name ("deno", "bun", "deno 16k", "deno bti", "bun bti"); none runs them all.
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bunCounts, denoCounts } from "./counts.mjs";
import { npmPackage, versionOf } from "./packages.mjs";
import { aptInstall, buildDist, echoed, report, runSteps, sh } from "./steps.mjs";

const root = new URL("..", import.meta.url).pathname;
const cache = join(root, ".cache", "arm64");
const only = process.argv.slice(2);

/** The arm64 sysroot of Debian's cross packages: qemu-user finds the dynamic loader there. */
const SYSROOT = "/usr/aarch64-linux-gnu";
const APT_PACKAGES = ["qemu-user-static", "libc6-arm64-cross", "libgcc-s1-arm64-cross", "binutils-aarch64-linux-gnu"];
/** The optional libraries of the tests (Debian package, soname); the cross packages have none. */
const ARM64_LIBRARIES = [["libsqlite3-0", "libsqlite3.so.0"], ["zlib1g", "libz.so.1"]];
/** qemu's environment besides QEMU_LD_PREFIX, the sysroot (`sysroot`). */
const QEMU_ENV = {
  // The default CPU model ("max") emulates pointer authentication so slowly that Deno runs ~100×
  // slower; Neoverse N1 is a real ARMv8.2 core without it.
  QEMU_CPU: "neoverse-n1",
  // The guest's address space, reserved whole at start (qemu's -R). Without it qemu-user's own
  // mappings (its host malloc arenas, 64 MiB reservations each, and its 128 MiB translation buffer)
  // land beside the guest's libraries, where the guest's /proc/self/maps does not show them: the
  // ±128 MiB a `b` reaches from libc was then taken by memory the library cannot see (every near
  // candidate EEXIST, measured: 1 race run in 4 found none). With it, the guest's maps are the
  // whole truth, as on a real arm64 machine. 16 TiB: Bun's start-up trips a qemu assertion with
  // 1 TiB or less.
  QEMU_RESERVED_VA: "0x100000000000",
  // Tells the tests that are too slow to run whole under emulation to sample (see
  // test/fixtures/identity_libc.ts, test/stress.test.ts).
  REDEFINE_TEST_EMULATED: "qemu-user",
};
/** Per run: qemu is slow, but a hung test must not eat CI's time. */
const TIMEOUT_MS = 15 * 60 * 1000;
/** The test files about page granularity: protections, writes, the code pool, trampolines, flushes. */
const PAGE_SIZE_TESTS = [
  "test/platform.test.ts",
  "test/redefine.test.ts",
  "test/original.test.ts",
  "test/flush.test.ts",
  "test/arm64_flush.test.ts",
  "test/safety.test.ts",
  "test/stress.test.ts",
  "test/identity.test.ts",
];
/**
 * The test files about arm64 Branch Target Identification, run once more on a CPU that has it:
 * qemu's Neoverse N2 (ARMv9.0) honours PROT_BTI, as hardware does; Neoverse N1 has no BTI, so there
 * they report skipped. About 15 s for Deno and 10 s for Bun; measured no slower than N1 here.
 */
const BTI_TESTS = ["test/bti.test.ts"];
const BTI_CPU = "neoverse-n2";
/** Our binfmt_misc entry; newer entries win, so it goes before a distribution's qemu-aarch64. */
const BINFMT_NAME = "redefine-qemu-aarch64";

/** True when `binary` is a qemu-user of version 8.1 or later. */
function honoursIcIvau(binary) {
  const m = /version (\d+)\.(\d+)/.exec(sh(binary, ["--version"]).stdout ?? "");
  return m !== null && (Number(m[1]) > 8 || (Number(m[1]) === 8 && Number(m[2]) >= 1));
}

/** This machine's Debian release (its cross libc is that release's), e.g. "bookworm". */
function debianCodename() {
  return /^VERSION_CODENAME=(\w+)/m.exec(readFileSync("/etc/os-release", "utf8"))?.[1];
}

/**
 * Downloads the Debian packages `names` from the suite `suite` into `dir`, for `architecture` (this
 * machine's when undefined), and unpacks them into `into`. Returns why that failed in one line, or
 * undefined. apt-get runs with its own sources list, package lists, cache and (empty) dpkg status
 * in `dir`, so the system's apt configuration and state stay untouched.
 */
function aptFetch(dir, suite, architecture, names, into) {
  mkdirSync(join(dir, "lists", "partial"), { recursive: true });
  mkdirSync(join(dir, "cache", "archives", "partial"), { recursive: true });
  writeFileSync(join(dir, "sources.list"), `deb http://deb.debian.org/debian ${suite} main\n`);
  const apt = [
    "-qq",
    "-o", `Dir::Etc::SourceList=${join(dir, "sources.list")}`,
    "-o", "Dir::Etc::SourceParts=/dev/null",
    "-o", "APT::Sandbox::User=root",
    "-o", `Dir::State::Lists=${join(dir, "lists")}`,
    "-o", `Dir::Cache=${join(dir, "cache")}`,
    "-o", "Dir::State::status=/dev/null",
    ...(architecture ? ["-o", `APT::Architecture=${architecture}`, "-o", `APT::Architectures=${architecture}`] : []),
  ];
  for (const old of readdirSync(dir).filter((f) => f.endsWith(".deb"))) rmSync(join(dir, old));
  // apt-get update exits 0 when an index cannot be fetched: then that warning is the reason.
  let said = "";
  for (const [command, options] of [[["update"], {}], [["download", ...names], { cwd: dir }]]) {
    const run = sh("apt-get", [...apt, ...command], options);
    said += `${run.stdout ?? ""}${run.stderr ?? ""}${run.error ? `${run.error.message}\n` : ""}`;
    if (run.status !== 0) {
      const why = /^W: Failed to fetch.*$/m.exec(said) ?? /^E: .*$/m.exec(said);
      return why?.[0] || said.trim().split("\n")[0] || `apt-get ${command[0]} exited ${run.status}`;
    }
  }
  const debs = readdirSync(dir).filter((f) => f.endsWith(".deb"));
  if (debs.length !== names.length) return `apt-get download gave ${debs.join(", ") || "nothing"} for ${names.join(", ")}`;
  rmSync(into, { recursive: true, force: true });
  mkdirSync(into, { recursive: true });
  const broken = debs.find((deb) => sh("dpkg-deb", ["-x", join(dir, deb), into]).status !== 0);
  for (const deb of debs) rmSync(join(dir, deb));
  return broken ? `dpkg-deb cannot unpack ${broken}` : undefined;
}

/**
 * A qemu-aarch64 of version 8.1 or later. Older ones (Debian 12 ships 7.2) ignore `ic ivau`, so
 * code written through a second, writable mapping (the code pool writes through one) keeps running
 * stale translations after it is rewritten, however it is flushed: a reused stub slot then runs
 * the previous patch's code, and Bun crashes. They also list /proc/self/maps wrongly. 8.1 and later
 * invalidate translations on `ic ivau`, as hardware does, so the emulated runs also exercise the
 * flush. Debian 12 has one in bookworm-backports: fetched with `aptFetch` and only qemu-aarch64
 * kept.
 */
function modernQemu() {
  if (honoursIcIvau("qemu-aarch64-static")) return "qemu-aarch64-static";
  const kept = join(cache, "qemu-aarch64");
  if (existsSync(kept) && honoursIcIvau(kept)) return kept;
  const suite = `${debianCodename()}-backports`;
  const dir = join(cache, "apt");
  const unpacked = join(dir, "unpacked");
  console.log(`fetching qemu-user from ${suite}`);
  const failed = aptFetch(dir, suite, undefined, [`qemu-user/${suite}`], unpacked);
  if (failed) {
    console.log(`cannot fetch qemu-user: ${failed}`);
    return null;
  }
  renameSync(join(unpacked, "usr", "bin", "qemu-aarch64"), kept);
  rmSync(unpacked, { recursive: true, force: true });
  return honoursIcIvau(kept) ? kept : null;
}

/**
 * The sysroot qemu runs the arm64 programs in: Debian's cross libc (`SYSROOT`) and the optional
 * libraries some tests use (`ARM64_LIBRARIES`), or `SYSROOT` alone when those cannot be had (the
 * tests then report themselves skipped). The cross libc has no arm64 libsqlite3 or libz beside it,
 * so the libraries come from this machine's Debian release for arm64 (apt, as in `aptFetch`),
 * unpacked into the cache where an arm64 Debian has them, /usr/lib/aarch64-linux-gnu (zlib's
 * /lib/aarch64-linux-gnu joins it, as on a merged-/usr system): the loader finds them there by its
 * default search path, as on arm64 hardware. The cross libc's lib/ and bin/ are linked in.
 */
function sysroot() {
  const root = join(cache, "sysroot");
  const libraries = join(root, "usr", "lib", "aarch64-linux-gnu");
  const have = () => ARM64_LIBRARIES.every(([, soname]) => existsSync(join(libraries, soname)));
  if (!have()) {
    const started = Date.now();
    const dir = join(cache, "apt-arm64");
    const unpacked = join(dir, "unpacked");
    const names = ARM64_LIBRARIES.map(([name]) => name);
    console.log(`fetching arm64 ${names.join(", ")} from ${debianCodename()}`);
    const failed = aptFetch(dir, debianCodename(), "arm64", names, unpacked);
    if (failed) {
      console.log(`WARNING: no arm64 ${names.join(", ")} (${failed}): the tests using them report skipped`);
      return SYSROOT;
    }
    rmSync(root, { recursive: true, force: true });
    mkdirSync(libraries, { recursive: true });
    for (const from of [join(unpacked, "usr", "lib", "aarch64-linux-gnu"), join(unpacked, "lib", "aarch64-linux-gnu")]) {
      if (!existsSync(from)) continue;
      for (const file of readdirSync(from)) renameSync(join(from, file), join(libraries, file));
    }
    rmSync(unpacked, { recursive: true, force: true });
    if (!have()) {
      console.log(`WARNING: the arm64 packages ${names.join(", ")} lack an expected library: the tests using them report skipped`);
      return SYSROOT;
    }
    console.log(`fetched in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  }
  for (const top of ["lib", "bin"]) {
    rmSync(join(root, top), { force: true });
    symlinkSync(join(SYSROOT, top), join(root, top));
  }
  return root;
}

/**
 * Lets the kernel run arm64 executables through `qemu` (binfmt_misc), so that a test under
 * emulation can start a child process of its own runtime. The entry uses the same magic as
 * Debian's and the F flag (the kernel opens the interpreter now).
 */
function registerBinfmt(qemu) {
  const dir = "/proc/sys/fs/binfmt_misc";
  if (existsSync(`${dir}/${BINFMT_NAME}`)) {
    if (readFileSync(`${dir}/${BINFMT_NAME}`, "utf8").includes(`interpreter ${qemu}\n`)) return;
    writeFileSync(`${dir}/${BINFMT_NAME}`, "-1");
  }
  if (!existsSync(`${dir}/register`)) sh("mount", ["-t", "binfmt_misc", "binfmt_misc", dir], { stdio: "inherit" });
  const magic = "\\x7f\\x45\\x4c\\x46\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x02\\x00\\xb7\\x00";
  const mask = "\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xfe\\xff\\xff\\xff";
  try {
    writeFileSync(`${dir}/register`, `:${BINFMT_NAME}:M::${magic}:${mask}:${qemu}:OPF`);
  } catch (error) {
    console.log(`cannot register qemu with binfmt_misc (${error.message}): tests that start arm64 child processes will fail`);
  }
}

function setUp() {
  const started = Date.now();
  aptInstall(APT_PACKAGES);
  for (const file of [`${SYSROOT}/lib/ld-linux-aarch64.so.1`, `${SYSROOT}/lib/libgcc_s.so.1`]) {
    if (!existsSync(file)) throw new Error(`${file} is missing after installing ${APT_PACKAGES.join(" ")}`);
  }
  mkdirSync(cache, { recursive: true });
  let qemu = modernQemu();
  if (!qemu) {
    console.log("WARNING: no qemu-aarch64 8.1 or later could be had; Debian's 7.2 ignores ic ivau (see modernQemu)");
    qemu = "qemu-aarch64-static";
  }
  const deno = join(npmPackage(cache, `@deno/linux-arm64-glibc@${versionOf("deno")}`), "deno");
  const bun = join(npmPackage(cache, `@oven/bun-linux-aarch64@${versionOf("bun")}`), "bin", "bun");
  for (const binary of [deno, bun]) {
    if (!existsSync(binary)) throw new Error(`${binary} is missing from its npm package`);
  }
  registerBinfmt(qemu);
  const prefix = sysroot();
  console.log(`set-up: ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return { deno, bun, qemu, prefix };
}

/** Runs the arm64 `binary` under `qemu`, with `qemuArgs` before it and `env` over `QEMU_ENV`. */
function emulate(qemu, binary, args, qemuArgs = [], env = {}) {
  return echoed(qemu, [...qemuArgs, binary, ...args], {
    cwd: root,
    // Child processes inherit QEMU_CPU through binfmt_misc's qemu, which reads it too.
    env: { ...process.env, ...QEMU_ENV, ...env, QEMU_LD_PREFIX: machine.prefix, NO_COLOR: "1" },
    timeout: TIMEOUT_MS,
  });
}

const machine = setUp();
console.log(
  `${sh(machine.qemu, ["--version"]).stdout.split("\n")[0]}; CPU ${QEMU_ENV.QEMU_CPU}; ` +
    `arm64 Deno ${versionOf("deno")}, Bun ${versionOf("bun")}`,
);

const steps = [
  buildDist,
  ["deno", () => denoCounts(emulate(machine.qemu, machine.deno, ["test", "-A", "--no-check", "test/"]))],
  ["bun", () => bunCounts(emulate(machine.qemu, machine.bun, ["test", "./test/"]))],
  // Kernels with 16 KiB pages exist (Apple silicon, some Android): nothing may assume 4096. Only
  // Debian's qemu 7.2 can still give the guest another page size (qemu 8 and later keep the
  // host's), and Bun panics at start-up with it, so only Deno runs there; child processes started
  // by the tests run through binfmt_misc with 4 KiB pages. Only the files whose subject is page
  // granularity run there (PAGE_SIZE_TESTS): qemu 7.2 with -p 16384 leaves out of the guest's
  // /proc/self/maps every mapping whose length is not a multiple of 16 KiB (each library's last,
  // .bss page among them, though it is mapped and readable), so tests that read loaded images
  // through the memory map are refused there, rightly; it ignores `ic ivau`, so a reused stub
  // slot can run stale code; and (also with 4 KiB pages) it prints a read+write page and the
  // read+write+execute page after it as one `rw-p` mapping, the second page's execute bit lost
  // (test/flush.test.ts maps its two pages so that they cannot merge). Both are the emulator's, measured; the 4 KiB steps run every file.
  ["deno 16k", () =>
    denoCounts(emulate("qemu-aarch64-static", machine.deno, ["test", "-A", "--no-check", ...PAGE_SIZE_TESTS], ["-p", "16384"]))],
  ["deno bti", () =>
    denoCounts(emulate(machine.qemu, machine.deno, ["test", "-A", "--no-check", ...BTI_TESTS], [], { QEMU_CPU: BTI_CPU }))],
  ["bun bti", () =>
    bunCounts(emulate(machine.qemu, machine.bun, ["test", ...BTI_TESTS.map((file) => `./${file}`)], [], { QEMU_CPU: BTI_CPU }))],
];

process.exit(report(runSteps(steps, { only, label: "arm64" })));
