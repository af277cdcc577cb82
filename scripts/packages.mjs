// What the cross-platform test scripts share: the versions of the x86-64 runtimes installed as
// devDependencies, and other platforms' builds of them fetched from npm into a cache.
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync } from "node:fs";
import { join } from "node:path";

const root = new URL("..", import.meta.url).pathname;

/** The version of an installed x86-64 devDependency (falls back to package.json's pin). */
export function versionOf(name) {
  const installed = join(root, "node_modules", name, "package.json");
  if (existsSync(installed)) return JSON.parse(readFileSync(installed, "utf8")).version;
  const pinned = JSON.parse(readFileSync(join(root, "package.json"), "utf8")).devDependencies[name];
  if (!/^\d+\.\d+\.\d+$/.test(pinned ?? "")) throw new Error(`no exact version of ${name} to match`);
  return pinned;
}

/** `npm pack`s `spec` into `cache` and extracts it once; returns the package directory. */
export function npmPackage(cache, spec) {
  const dir = join(cache, spec.replace(/[@/]/g, "_").replace(/^_/, ""));
  if (existsSync(join(dir, "package", "package.json"))) return join(dir, "package");
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  console.log(`npm pack ${spec}`);
  const pack = spawnSync("npm", ["pack", spec, "--pack-destination", dir, "--silent"], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
  });
  const tarball = readdirSync(dir).find((f) => f.endsWith(".tgz"));
  if (pack.status !== 0 || !tarball) throw new Error(`npm pack ${spec} failed`);
  // Extract beside, then rename: an interrupted extraction never looks finished.
  const partial = join(dir, "partial");
  mkdirSync(partial);
  if (spawnSync("tar", ["-xzf", join(dir, tarball), "-C", partial], { stdio: "inherit" }).status !== 0) {
    throw new Error(`extracting ${tarball} failed`);
  }
  renameSync(join(partial, "package"), join(dir, "package"));
  rmSync(partial, { recursive: true, force: true });
  rmSync(join(dir, tarball));
  return join(dir, "package");
}
