// `npm run test:windows`: the Windows x64 test suite, run for real under Wine on this Linux
// machine, with the Windows builds of Deno and Bun (the versions of the Linux devDependencies, from
// npm). Wine 10 comes from a Debian 13 (trixie) chroot made with debootstrap: Debian 12's Wine 8
// cannot run Deno at all (V8's memory reservations) and runs Bun only with a bcryptprimitives.dll
// forwarder. Sets up what it needs first and skips what is already there. Closes with one line:
// "N passed, N failed, N skipped".
//
// Only the test files that hold on Windows run (see WINDOWS_TESTS); the rest bind libc.so.6 or
// call Linux tools. Arguments pick runtimes by name ("deno", "bun"); none runs both. With
// `--bench`, the Windows benchmarks (WINDOWS_BENCHES) run instead, each run counted as one step.
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { bunCounts, denoCounts } from "./counts.mjs";
import { npmPackage, versionOf } from "./packages.mjs";
import { aptInstall, buildDist, report, runSteps, sh, totals } from "./steps.mjs";

const root = new URL("..", import.meta.url).pathname.replace(/\/$/, "");
const cache = join(root, ".cache", "windows");
const chroot = join(cache, "trixie");
const benchmarks = process.argv.includes("--bench");
const only = process.argv.slice(2).filter((a) => a !== "--bench");

/** The test files that run on Windows: pure ones, the fake-FFI ones, and the Windows end-to-end one. */
const WINDOWS_TESTS = [
  "test/x86_64_decoder.test.ts",
  "test/darwin.test.ts",
  "test/windows.test.ts",
  "test/windows_e2e.test.ts",
  "test/introspect_windows.test.ts",
  "test/introspect_darwin.test.ts",
  "test/introspect_windows_e2e.test.ts",
  "test/windows_callers_e2e.test.ts",
  "test/windows_stress_e2e.test.ts",
  "test/windows_attach_e2e.test.ts",
  "test/bundle.test.ts",
  // Last: a process-wide fake clock holds Deno's Date.now() in the past for up to a minute after it.
  "test/windows_mock_e2e.test.ts",
];
/** The benchmarks that measure Windows itself (`--bench`); they print ratios, under Wine here. */
const WINDOWS_BENCHES = ["bench/windows_write.bench.ts"];
const MIRROR = "http://deb.debian.org/debian";
/** Per run: Wine starts slowly the first time (it makes its prefix), but a hang must not eat CI. */
const TIMEOUT_MS = 10 * 60 * 1000;

function must(result, what) {
  if (result.status !== 0) {
    process.stdout.write((result.stdout ?? "") + (result.stderr ?? ""));
    throw new Error(`${what} failed (${result.error?.message ?? `exit ${result.status}`})`);
  }
  return result;
}

function mountPoints() {
  return readFileSync("/proc/self/mountinfo", "utf8").split("\n").map((l) => l.split(" ")[4]).filter(Boolean);
}

function mounted(path) {
  return mountPoints().includes(path);
}

/**
 * Deletes a chroot tree, but only once nothing is mounted inside it: with /dev or this checkout
 * bind-mounted there, a recursive delete would go through into them.
 */
function removeTree(path) {
  unmountAll(path);
  const inside = mountPoints().filter((m) => m === path || m.startsWith(path + "/"));
  if (inside.length) throw new Error(`refusing to delete ${path}: still mounted inside it: ${inside.join(", ")}`);
  rmSync(path, { recursive: true, force: true });
}

function mount(args, target) {
  if (!mounted(target)) must(sh("mount", [...args, target]), `mount ${target}`);
}

/** The chroot's mounts: /proc and /dev for Wine, and this checkout at its own path. */
function mountAll() {
  mount(["-t", "proc", "proc"], join(chroot, "proc"));
  mount(["--bind", "/dev"], join(chroot, "dev"));
  mkdirSync(join(chroot, root), { recursive: true });
  mount(["--bind", root], join(chroot, root));
}

/** Unmounts everything mounted inside `tree` (the chroot by default), deepest first. */
function unmountAll(tree = chroot) {
  const inside = mountPoints().filter((m) => m.startsWith(tree + "/")).sort((a, b) => b.length - a.length);
  for (const path of inside) sh("umount", [path]);
}

/** Debian 13 with Wine 10, once: the marker file is written only when all of it is there. */
function setUpChroot() {
  const ready = `${chroot}.ready`;
  if (existsSync(ready)) return;
  aptInstall(["debootstrap"]);
  const partial = `${chroot}.partial`;
  removeTree(partial);
  removeTree(chroot);
  console.log("debootstrap trixie (Debian 13) for Wine 10");
  must(sh("debootstrap", ["--variant=minbase", "trixie", partial, MIRROR], { stdio: "inherit" }), "debootstrap trixie");
  renameSync(partial, chroot);
  mountAll();
  const env = { ...process.env, DEBIAN_FRONTEND: "noninteractive" };
  must(sh("chroot", [chroot, "apt-get", "update", "-qq"], { env, stdio: "inherit" }), "apt-get update in the chroot");
  must(
    sh("chroot", [chroot, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "wine", "wine64"], { env, stdio: "inherit" }),
    "installing Wine in the chroot",
  );
  must(sh("chroot", [chroot, "wine", "--version"]), "wine --version in the chroot");
  writeFileSync(ready, "");
}

function setUp() {
  const started = Date.now();
  const deno = join(npmPackage(cache, `@deno/win32-x64@${versionOf("deno")}`), "deno.exe");
  const bun = join(npmPackage(cache, `@oven/bun-windows-x64@${versionOf("bun")}`), "bin", "bun.exe");
  for (const binary of [deno, bun]) {
    if (!existsSync(binary)) throw new Error(`${binary} is missing from its npm package`);
  }
  setUpChroot();
  mountAll();
  console.log(`set-up: ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return { deno, bun };
}

/**
 * Runs the Windows `binary` under Wine in the chroot. Wine's processes keep the standard output
 * open after the program ends, so the output goes to a file and `wineserver -k` ends the rest.
 */
function wine(name, binary, args) {
  const started = Date.now();
  const out = join(cache, `${name}.out`), status = join(cache, `${name}.status`);
  rmSync(out, { force: true });
  rmSync(status, { force: true });
  const quote = (s) => `'${s.replace(/'/g, "'\\''")}'`;
  const script = [
    `cd ${quote(root)}`,
    `wine ${[binary, ...args].map(quote).join(" ")} > ${quote(out)} 2>&1 < /dev/null`,
    `echo $? > ${quote(status)}`,
    "wineserver -k",
  ].join("; ");
  const env = {
    PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    HOME: "/root",
    WINEPREFIX: "/root/.wine-redefine",
    WINEDEBUG: "-all",
    XDG_RUNTIME_DIR: "/tmp",
    NO_COLOR: "1",
  };
  const result = sh("chroot", [chroot, "bash", "-c", script], { env, timeout: TIMEOUT_MS, stdio: "ignore" });
  const output = existsSync(out) ? readFileSync(out, "utf8") : "";
  process.stdout.write(output);
  const code = existsSync(status) ? Number(readFileSync(status, "utf8")) : null;
  if (result.error) console.log(`\n${result.error.message}`);
  return { output, ok: code === 0, seconds: (Date.now() - started) / 1000 };
}

const done = totals();
try {
  const binaries = setUp();
  const version = sh("chroot", [chroot, "wine", "--version"]).stdout.trim();
  console.log(`${version} (Debian 13 chroot); Windows Deno ${versionOf("deno")}, Bun ${versionOf("bun")}`);
  const ran = (name, binary, args) => WINDOWS_BENCHES.reduce(([passed, failed], file) => {
    const { ok } = wine(name, binary, [...args, file]);
    return ok ? [passed + 1, failed] : [passed, failed + 1];
  }, [0, 0]);
  const steps = benchmarks
    ? [
      ["deno", () => ran("deno", binaries.deno, ["run", "-A", "--no-check"])],
      ["bun", () => ran("bun", binaries.bun, ["run"])],
    ]
    : [
      buildDist,
      ["deno", () => denoCounts(wine("deno", binaries.deno, ["test", "-A", "--no-check", ...WINDOWS_TESTS]))],
      ["bun", () => bunCounts(wine("bun", binaries.bun, ["test", ...WINDOWS_TESTS.map((f) => `./${f}`)]))],
    ];
  runSteps(steps, { only, label: benchmarks ? "windows bench" : "windows", into: done });
} catch (error) {
  console.log(`\nwindows set-up failed: ${error.message}`);
  done.failed += 1;
} finally {
  unmountAll();
}
writeFileSync(join(cache, benchmarks ? "bench-summary.txt" : "summary.txt"), done.lines.join("\n") + "\n");
process.exit(report(done));
