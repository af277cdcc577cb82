// `npm run test:arm64`: the whole test suite on Linux arm64, emulated by qemu-user on this x86-64
// machine, for Deno and for Bun, plus the Deno suite once more with 16 KiB pages. Sets up what it
// needs first and skips what is already there: Debian's qemu and arm64 libraries, a qemu recent
// enough to honour instruction-cache flushes (see `modernQemu`), the arm64 Deno and Bun of the same
// versions as the x86-64 devDependencies (from npm), and binfmt_misc so that tests can start arm64
// child processes. Closes with one line: "N passed, N failed, N skipped".
//
// Arguments pick steps by name ("deno", "bun", "deno 16k"); none runs them all.
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bunCounts, denoCounts } from "./counts.mjs";
import { npmPackage, versionOf } from "./packages.mjs";
import { aptInstall, echoed, report, runSteps, sh } from "./steps.mjs";

const root = new URL("..", import.meta.url).pathname;
const cache = join(root, ".cache", "arm64");
const only = process.argv.slice(2);

/** The arm64 sysroot of Debian's cross packages: qemu-user finds the dynamic loader there. */
const SYSROOT = "/usr/aarch64-linux-gnu";
const APT_PACKAGES = ["qemu-user-static", "libc6-arm64-cross", "libgcc-s1-arm64-cross", "binutils-aarch64-linux-gnu"];
const QEMU_ENV = {
  QEMU_LD_PREFIX: SYSROOT,
  // The default CPU model ("max") emulates pointer authentication so slowly that Deno runs ~100×
  // slower; Neoverse N1 is a real ARMv8.2 core without it.
  QEMU_CPU: "neoverse-n1",
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
/** Our binfmt_misc entry; newer entries win, so it goes before a distribution's qemu-aarch64. */
const BINFMT_NAME = "redefine-qemu-aarch64";

/** True when `binary` is a qemu-user of version 8.1 or later. */
function honoursIcIvau(binary) {
  const m = /version (\d+)\.(\d+)/.exec(sh(binary, ["--version"]).stdout ?? "");
  return m !== null && (Number(m[1]) > 8 || (Number(m[1]) === 8 && Number(m[2]) >= 1));
}

/**
 * A qemu-aarch64 of version 8.1 or later. Older ones (Debian 12 ships 7.2) ignore `ic ivau`, so
 * code written through a second, writable mapping (the code pool writes through one) keeps running
 * stale translations after it is rewritten, however it is flushed: a reused stub slot then runs
 * the previous patch's code, and Bun crashes. They also list /proc/self/maps wrongly. 8.1 and later
 * invalidate translations on `ic ivau`, as hardware does, so the emulated runs also exercise the
 * flush. Debian 12 has one in bookworm-backports: fetched with apt-get (its own package lists in
 * the cache, the system's apt configuration untouched) and only qemu-aarch64 kept.
 */
function modernQemu() {
  if (honoursIcIvau("qemu-aarch64-static")) return "qemu-aarch64-static";
  const kept = join(cache, "qemu-aarch64");
  if (existsSync(kept) && honoursIcIvau(kept)) return kept;
  const codename = /^VERSION_CODENAME=(\w+)/m.exec(readFileSync("/etc/os-release", "utf8"))?.[1];
  const dir = join(cache, "apt");
  mkdirSync(join(dir, "lists", "partial"), { recursive: true });
  writeFileSync(join(dir, "sources.list"), `deb http://deb.debian.org/debian ${codename}-backports main\n`);
  const apt = [
    "-qq",
    "-o", `Dir::Etc::SourceList=${join(dir, "sources.list")}`,
    "-o", "Dir::Etc::SourceParts=/dev/null",
    "-o", "APT::Sandbox::User=root",
    "-o", `Dir::State::Lists=${join(dir, "lists")}`,
  ];
  console.log(`fetching qemu-user from ${codename}-backports`);
  if (sh("apt-get", [...apt, "update"], { stdio: "inherit" }).status !== 0) return null;
  if (sh("apt-get", [...apt, "download", `qemu-user/${codename}-backports`], { cwd: dir, stdio: "inherit" }).status !== 0) {
    return null;
  }
  const deb = readdirSync(dir).find((f) => f.startsWith("qemu-user_") && f.endsWith(".deb"));
  if (!deb) return null;
  const unpacked = join(dir, "unpacked");
  rmSync(unpacked, { recursive: true, force: true });
  mkdirSync(unpacked);
  if (sh("dpkg-deb", ["-x", join(dir, deb), unpacked]).status !== 0) return null;
  renameSync(join(unpacked, "usr", "bin", "qemu-aarch64"), kept);
  rmSync(unpacked, { recursive: true, force: true });
  rmSync(join(dir, deb));
  return honoursIcIvau(kept) ? kept : null;
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
  console.log(`set-up: ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return { deno, bun, qemu };
}

/** Runs the arm64 `binary` under `qemu`, with `qemuArgs` before it. */
function emulate(qemu, binary, args, qemuArgs = []) {
  return echoed(qemu, [...qemuArgs, binary, ...args], {
    cwd: root,
    env: { ...process.env, ...QEMU_ENV, NO_COLOR: "1" },
    timeout: TIMEOUT_MS,
  });
}

const machine = setUp();
console.log(
  `${sh(machine.qemu, ["--version"]).stdout.split("\n")[0]}; CPU ${QEMU_ENV.QEMU_CPU}; ` +
    `arm64 Deno ${versionOf("deno")}, Bun ${versionOf("bun")}`,
);

const steps = [
  ["deno", () => denoCounts(emulate(machine.qemu, machine.deno, ["test", "-A", "--no-check", "test/"]))],
  ["bun", () => bunCounts(emulate(machine.qemu, machine.bun, ["test", "./test/"]))],
  // Kernels with 16 KiB pages exist (Apple silicon, some Android): nothing may assume 4096. Only
  // Debian's qemu 7.2 can still give the guest another page size (qemu 8 and later keep the
  // host's), and Bun panics at start-up with it, so only Deno runs there; child processes started
  // by the tests run through binfmt_misc with 4 KiB pages. Only the files whose subject is page
  // granularity run there (PAGE_SIZE_TESTS): qemu 7.2 with -p 16384 leaves out of the guest's
  // /proc/self/maps every mapping whose length is not a multiple of 16 KiB (each library's last,
  // .bss page among them, though it is mapped and readable), so tests that read loaded images
  // through the memory map are refused there, rightly; and it ignores `ic ivau`, so a reused stub
  // slot can run stale code. Both are the emulator's, measured; the 4 KiB steps run every file.
  ["deno 16k", () =>
    denoCounts(emulate("qemu-aarch64-static", machine.deno, ["test", "-A", "--no-check", ...PAGE_SIZE_TESTS], ["-p", "16384"]))],
];

process.exit(report(runSteps(steps, { only, label: "arm64" })));
