// A patch whose library is unloaded before it is restored: restore must not read through the
// mapping it found when the patch was made, nor write into whatever was mapped there since. In a
// child process (test/fixtures/unloaded.ts), so a crash fails one test.
import { assert, test } from "./harness.ts";
import { runCase } from "./cases.ts";
import { runtime } from "./native.ts";

const fixture = new URL("./fixtures/unloaded.ts", import.meta.url);
const linuxOnly = { skip: runtime.os === "linux" ? undefined : "dlopen of a generated ELF library is Linux's" };

/** Runs case `name`: its error message must match `message`, the rest equal `expected`. */
function check(name: string, message: RegExp | null, expected: object): void {
  const seen = runCase(fixture, name) as Record<string, unknown>;
  if (message) assert.match(String(seen.message), message);
  assert.deepEqual({ ...seen, message: "" }, { ...expected, message: "" });
}

for (const kind of ["JS replacement", "native replacement"]) {
  for (const reused of [false, true]) {
    const name = reused ? `${kind}, memory reused` : kind;
    const title = reused ? "and fresh memory mapped in its place " : "";
    test(`restore after the library was unloaded ${title}(${kind}): UNLOADED, the patch dropped, restoreAll works`, () => {
      check(name, /its code is gone \(unmapped, or other memory in its place\), so its library was unloaded.*The patch is dropped; restore patches before unloading/s, {
        before: 42,
        patched: true,
        error: "UNLOADED",
        activeAfter: false,
        untouched: true,
        otherStillPatched: true,
        restoreAll: "none",
        otherRestored: true,
      });
    }, linuxOnly);
  }
}

test("restoreAll() after a patched library was unloaded: UNLOADED, nothing else restored; a second restores the rest", () => {
  assert.deepEqual(runCase(fixture, "restoreAll"), {
    first: "UNLOADED",
    between: { active: false, otherActive: true, otherPatched: true },
    second: "none",
    otherRestored: true,
  });
}, linuxOnly);

test("restore of a callers patch after one of its two libraries was unloaded: the other's slot restored, no error", () => {
  check("callers, one library unloaded", null, {
    patched: true, error: "none", activeAfter: false, untouched: true, restoredB: true,
  });
}, linuxOnly);

for (const reused of [false, true]) {
  test(`restore of a callers patch after both its libraries were unloaded${reused ? ", fresh memory in their place" : ""}: UNLOADED, the patch dropped`, () => {
    check(`callers, every library unloaded${reused ? ", memory reused" : ""}`, /the import slots it rewrote are gone.*The patch is dropped/s, {
      patched: true, error: "UNLOADED", activeAfter: false, untouched: true, restoredB: null,
    });
  }, linuxOnly);
}
