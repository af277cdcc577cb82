/**
 * Redefining for some callers only: the import slots of the generated library (a RELRO GOT bound
 * at load), found, checked and rewritten with one store each, protections given back exactly; the
 * program's own calls of the same functions untouched.
 */
import { assert, assertCode, test } from "./harness.ts";
import { callerNames, callerSlots, callTarget, pointerBytes } from "../src/import_slots.ts";
import { writeCode } from "../src/code_memory.ts";
import { modules } from "../src/introspect.ts";
import { platform } from "../platform/mod.ts";
import { loadImportLibrary } from "./import_library.ts";
import { bytesAt, libc, os, protectionAt, runtime } from "./native.ts";

const first = loadImportLibrary(runtime, os, "callers_a_");
const second = loadImportLibrary(runtime, os, "callers_b_");
const clock = runtime.open("libc.so.6", { time: { parameters: ["pointer"], result: "i64" } });

test("callerSlots: the slots of the named libraries, what each holds, whatever the name's spelling", () => {
  const [slot] = callerSlots("time", first.path);
  const module = modules().find((m) => m.path === first.path)!;
  assert.equal(slot.library.base, module.base);
  assert.equal(slot.slot, module.base + BigInt(first.library.slotOffset(0)));
  assert.equal(slot.kind, "jump_slot");
  assert.equal(slot.held, os.symbolAddress("time"));
  assert.deepEqual(callerSlots("time", [module.name]), [slot], "by the name the loader lists");
  assert.deepEqual(callerSlots("time", [first.path, first.path]), [slot], "a library named twice counts once");
  const both = callerSlots("clock_gettime", [first.path, second.path]);
  assert.deepEqual(both.map((s) => [s.library.path, s.kind]), [[first.path, "glob_dat"], [second.path, "glob_dat"]]);
});

test("callerSlots: a library not loaded, one not importing the symbol, and bad 'callers' are typed errors", () => {
  assertCode(() => callerSlots("time", "libnot-loaded.so.3"), "LIBRARY_NOT_FOUND");
  assertCode(() => callerSlots("getpid", first.path), "NOT_IMPORTED", /does not import 'getpid'/);
  assertCode(() => callerSlots("time", [first.path, "libc.so.6"]), "NOT_IMPORTED", /libc\.so\.6/);
  assertCode(() => callerSlots("time", `${first.path}\0x`), "LIBRARY_NOT_FOUND", /NUL/);
  for (const bad of [[], [42], 7, null, {}]) assertCode(() => callerNames(bad), "LIBRARY_NOT_FOUND");
});

test("callTarget: a bound slot's value; a lazily bound one's (pointing into its own PLT) is resolved", () => {
  const [slot] = callerSlots("time", first.path);
  assert.equal(callTarget(slot, () => 1n), slot.held);
  const lazy = { ...slot, held: slot.library.base + 0x100n };
  assert.equal(callTarget(lazy, () => 1234n), 1234n);
});

test("one slot rewritten on its RELRO page: that library's calls change, the program's do not, bytes and protection come back", () => {
  const [slot] = callerSlots("time", first.path);
  const before = bytesAt(slot.slot, 8);
  const protection = protectionAt(slot.slot);
  assert.equal(protection, 1, "the GOT is read-only after relocation (RELRO)");
  const pid = libc.getpid() as number;
  writeCode(platform(), [{ address: slot.slot, bytes: pointerBytes(os.symbolAddress("getpid", "libc.so.6")) }]);
  try {
    assert.equal(protectionAt(slot.slot), protection, "protection given back while patched");
    assert.equal(first.time(), BigInt(pid), "the library now calls getpid for time");
    assert.ok(Number(second.time()) > 1_000_000_000, "the other copy of the library still gets the time");
    assert.ok(Number(clock.time(0n)) > 1_000_000_000, "the program's own call of libc time is untouched");
  } finally {
    writeCode(platform(), [{ address: slot.slot, bytes: before }]);
  }
  assert.deepEqual(bytesAt(slot.slot, 8), before);
  assert.equal(protectionAt(slot.slot), protection);
  assert.ok(Number(first.time()) > 1_000_000_000);
});
