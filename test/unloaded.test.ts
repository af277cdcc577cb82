// A patch whose library is unloaded before it is restored: restore must not read through the
// mapping it found when the patch was made. In a child process (test/fixtures/unloaded.ts), so
// a crash fails one test.
import { assert, test } from "./harness.ts";
import { runCase } from "./cases.ts";
import { runtime } from "./native.ts";

const fixture = new URL("./fixtures/unloaded.ts", import.meta.url);
const linuxOnly = { skip: runtime.os === "linux" ? undefined : "dlopen of a generated ELF library is Linux's" };

/**
 * Runs `name` and compares what it saw with `unloaded`, or — when the restore found one of the
 * places mapped again by something else since the unload, and refused to judge bytes not its own
 * (PATCH_MODIFIED, the patch kept) — with `reused`. `message` is matched against the error's.
 */
function check(name: string, message: RegExp | null, unloaded: object, reused: object): void {
  const seen = runCase(fixture, name) as Record<string, unknown>;
  if (seen.reused && seen.error === "PATCH_MODIFIED") {
    assert.deepEqual({ ...seen, message: "" }, { ...reused, error: "PATCH_MODIFIED", message: "", reused: true });
    return;
  }
  if (message) assert.match(String(seen.message), message);
  assert.deepEqual({ ...seen, message: "", reused: false }, { ...unloaded, message: "", reused: false });
}

for (const kind of ["JS replacement", "native replacement"]) {
  test(`restore after the library was unloaded (${kind}): UNLOADED, the patch dropped, restoreAll works`, () => {
    const common = { before: 42, patched: true, unloaded: true, otherStillPatched: true };
    check(
      kind,
      /its code is no longer mapped, so its library was unloaded.*The patch is dropped; restore patches before unloading/s,
      { ...common, error: "UNLOADED", activeAfter: false, restoreAll: "none", otherRestored: true },
      { ...common, activeAfter: true, restoreAll: "PATCH_MODIFIED", otherRestored: false },
    );
  }, linuxOnly);
}

test("restore of a callers patch after one of its two libraries was unloaded: the other's slot restored, no error", () => {
  check(
    "callers, one library unloaded",
    null,
    { patched: true, error: "none", activeAfter: false, restoredB: true },
    { patched: true, activeAfter: true, restoredB: false },
  );
}, linuxOnly);

test("restore of a callers patch after both its libraries were unloaded: UNLOADED, the patch dropped", () => {
  check(
    "callers, every library unloaded",
    /the import slots it rewrote are no longer mapped.*The patch is dropped/s,
    { patched: true, error: "UNLOADED", activeAfter: false, restoredB: null },
    { patched: true, activeAfter: true, restoredB: null },
  );
}, linuxOnly);
