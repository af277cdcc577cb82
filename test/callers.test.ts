/**
 * Redefining for some callers only: the import slots of the generated library (a RELRO GOT bound
 * at load), found, checked and rewritten with one store each, protections given back exactly; the
 * program's own calls of the same functions untouched.
 */
import { assert, assertCode, test } from "./harness.ts";
import { exports, redefine, redefineAll, restoreAll, transaction } from "../mod.ts";
import { callerNames, callerSlots, callTarget, pointerBytes } from "../src/import_slots.ts";
import { writeCode } from "../src/code_memory.ts";
import { modules } from "../src/introspect.ts";
import { platform } from "../platform/mod.ts";
import { IMPORTS, loadImportLibrary } from "./import_library.ts";
import { bytesAt, callOnAnotherThread, libc, os, protectionAt, runtime } from "./native.ts";

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

const slotOf = (library: typeof first, i: number) => callerSlots(IMPORTS[i].name, library.path)[0].slot;
const real = (t: bigint) => Number(t) > 1_000_000_000;

test("redefine with callers: that library's time is the fake, the program's own FFI call of libc time is not", () => {
  const slot = slotOf(first, 0);
  const before = bytesAt(slot, 8);
  const patch = redefine({ symbol: "time", parameters: ["pointer"], result: "i64", callers: first.path }, () => 1234n);
  try {
    assert.equal(patch.active, true);
    assert.equal(patch.address, os.symbolAddress("time"), "the function the slot led to (glibc: the vDSO's time)");
    assert.equal(patch.patchedAddress, slot);
    assert.equal(first.time(), 1234n);
    assert.ok(real(second.time()), "another library importing time is untouched");
    assert.ok(real(clock.time(0n)), "the program's own call of libc time is untouched");
    assert.ok(real(patch.original(0n)), "original calls what the slot held: the vDSO's time");
    assert.equal(protectionAt(slot), 1, "the RELRO page is read-only again while patched");
    const callTime = exports(first.path).find((e) => e.name === first.library.caller(0))!.address;
    assert.ok(real(callOnAnotherThread(callTime)), "a call from another thread goes to the original");
  } finally {
    patch.restore();
  }
  assert.equal(patch.active, false);
  assert.deepEqual(bytesAt(slot, 8), before, "the slot's exact value is back");
  assert.equal(protectionAt(slot), 1);
  assert.ok(real(first.time()));
});

test("redefine with callers: a native replacement through GLOB_DAT slots of two libraries, restored exactly", () => {
  const slots = [slotOf(first, 2), slotOf(second, 2)];
  const before = slots.map((s) => bytesAt(s, 8));
  const pid = libc.getpid() as number;
  const ts = new Uint8Array(16);
  {
    using _patch = redefine(
      { symbol: "clock_gettime", parameters: ["i32", "pointer"], result: "i32", callers: [first.path, second.path] },
      { symbol: "getpid", library: "libc.so.6" },
    );
    assert.equal(first.clockGettime(0, ts), pid);
    assert.equal(second.clockGettime(0, ts), pid);
    assert.deepEqual(bytesAt(slots[0], 8), bytesAt(slots[1], 8), "both slots lead to getpid itself");
  }
  assert.deepEqual(slots.map((s) => bytesAt(s, 8)), before);
  assert.equal(first.clockGettime(0, ts), 0);
});

test("redefine with callers: not loaded, not imported, bad names — typed errors with nothing written", () => {
  const slot = slotOf(first, 0);
  const before = bytesAt(slot, 8);
  const time = { symbol: "time", parameters: ["pointer"], result: "i64" } as const;
  assertCode(() => redefine({ ...time, callers: "libnot-loaded.so.3" }, () => 1n), "LIBRARY_NOT_FOUND");
  assertCode(() => redefine({ ...time, callers: [first.path, "libc.so.6"] }, () => 1n), "NOT_IMPORTED");
  assertCode(() => redefine({ ...time, symbol: "getppid", callers: first.path }, () => 1n), "NOT_IMPORTED");
  assertCode(() => redefine({ ...time, symbol: "time\0x", callers: first.path }, () => 1n), "SYMBOL_NOT_FOUND", /NUL/);
  assertCode(() => redefine({ ...time, callers: [] }, () => 1n), "LIBRARY_NOT_FOUND");
  assert.deepEqual(bytesAt(slot, 8), before);
  assert.ok(real(first.time()));
});

test("redefine with callers: a second patch of the same slot layers on the first and restores in order", () => {
  const slot = slotOf(first, 0);
  const before = bytesAt(slot, 8);
  const time = { symbol: "time", parameters: ["pointer"], result: "i64", callers: first.path } as const;
  const a = redefine(time, () => 1n);
  const b = redefine(time, (t): bigint => b.original(t) + 10n);
  assert.equal(first.time(), 11n);
  assert.equal(b.depth, 1);
  assertCode(() => a.restore(), "OUT_OF_ORDER");
  b.restore();
  assert.equal(first.time(), 1n);
  a.restore();
  assert.deepEqual(bytesAt(slot, 8), before);
});

test("redefine with callers stacks with an entry patch of the same function, in either order", () => {
  const slot = slotOf(first, 3);
  const entry = os.symbolAddress("labs", "libc.so.6");
  const before = { slot: bytesAt(slot, 8), entry: bytesAt(entry, 16) };
  const labs = { symbol: "labs", library: "libc.so.6", parameters: ["i64"], result: "i64" } as const;
  for (const entryFirst of [true, false]) {
    const make = () => redefine(labs, () => 100n);
    const whole = entryFirst ? make() : undefined;
    const scoped = redefine({ ...labs, callers: first.path }, (x): bigint => scoped.original(x) + 1n);
    const wholeLater = whole ?? make();
    assert.equal(first.labs(-5n), 101n, "the library's call: its scoped replacement, then the entry patch");
    assert.equal(libc.labs(-5n), 100n, "the program's call: the entry patch only");
    if (entryFirst) {
      scoped.restore();
      wholeLater.restore();
    } else {
      wholeLater.restore();
      assert.equal(first.labs(-5n), 6n, "the scoped patch alone, its original the real labs");
      scoped.restore();
    }
    assert.deepEqual({ slot: bytesAt(slot, 8), entry: bytesAt(entry, 16) }, before);
  }
});

test("redefine with callers in transactions: all together, or nothing when the body throws", () => {
  const slot = slotOf(first, 0);
  const before = bytesAt(slot, 8);
  const time = { symbol: "time", parameters: ["pointer"], result: "i64", callers: first.path } as const;
  const [scoped, entry] = redefineAll([
    [time, () => 7n],
    [{ symbol: "labs", library: "libc.so.6", parameters: ["i64"], result: "i64" }, () => 3n],
  ]);
  assert.equal(first.time(), 7n);
  assert.equal(libc.labs(-1n), 3n);
  restoreAll();
  assert.equal(scoped.active || entry.active, false);
  assert.deepEqual(bytesAt(slot, 8), before);
  let made: { active: boolean } | undefined;
  assert.throws(() =>
    transaction(() => {
      made = redefine(time, () => 8n);
      throw new Error("changed my mind");
    }), /changed my mind/);
  assert.equal(made!.active, false);
  assert.deepEqual(bytesAt(slot, 8), before);
  assert.ok(real(first.time()));
});

test("redefine with callers: a library loaded after the patch is not affected", () => {
  using _patch = redefine({ symbol: "time", parameters: ["pointer"], result: "i64", callers: first.path }, () => 5n);
  const later = loadImportLibrary(runtime, os, "callers_later_");
  assert.equal(first.time(), 5n);
  assert.ok(real(later.time()));
});

test("redefine with callers: restoring a slot's patch and redefining it in one transaction layers on what stays", () => {
  const slot = slotOf(first, 0);
  const before = bytesAt(slot, 8);
  const time = { symbol: "time", parameters: ["pointer"], result: "i64", callers: first.path } as const;
  const a = redefine(time, () => 1n);
  const b = redefine(time, () => 2n);
  const c = transaction(() => {
    b.restore();
    return redefine(time, (t): bigint => c.original(t) + 30n);
  });
  assert.equal(b.active, false);
  assert.equal(first.time(), 31n, "c layered on a, the patch that stays");
  c.restore();
  assert.equal(first.time(), 1n);
  a.restore();
  assert.deepEqual(bytesAt(slot, 8), before);
});
