// One process, many isolates: Workers, and `deno test --parallel` files, each load their own copy
// of redefine. The cases run in child processes (test/fixtures/isolates_*.ts, parallel_mock.ts),
// so a crash is a failed test, not a dead suite.
import { assert, fixtureJson, runtimeName, spawnRuntime, test } from "./harness.ts";
import { redefine } from "../mod.ts";
import { machine } from "../src/registry.ts";
import { PROT_EXEC, PROT_READ } from "../platform/mod.ts";
import { bytesAt, libc, mapPages, os, runtime } from "./native.ts";

/**
 * The functions the races redefine while other isolates call them: each one's first instruction
 * is as long as the entry jump. A thread that has run a function's first instruction when another
 * thread's entry jump goes live resumes at the second, in the middle of the jump when the jump
 * reaches past the first (README, "Not guaranteed"): racing glibc's `labs` (a 3-byte `mov rax,
 * rdi` first) killed Bun's main thread once in a 2-core CI run, an illegal instruction at labs+3
 * while the Worker's patch landed. `getuid`'s and `getgid`'s first instruction, `mov eax, N`, is 5
 * bytes, the near jump's length (an arm64 `b` is always one instruction).
 */
const RACED = ["getuid", "getgid"] as const;
const ids = runtime.open("libc.so.6", {
  getuid: { parameters: [], result: "i32" },
  getgid: { parameters: [], result: "i32" },
});

/** Runs test/fixtures/`name` under this runtime; the last line of JSON it printed. */
function fixture(name: string, args: string[], timeout = 30_000) {
  return fixtureJson(new URL(`./fixtures/${name}`, import.meta.url), args, timeout);
}

interface Report {
  toggles: number;
  wrong: number;
  refused: Record<string, number>;
}

function race(where: "two" | "main", first: string, second: string): Report[] {
  const raced: readonly string[] = RACED;
  assert.ok(raced.includes(first) && raced.includes(second), `${first} and ${second} must be in RACED (see there)`);
  const reports: Report[] = fixture("isolates_race.ts", [where, first, second, "1500"]);
  for (const report of reports) {
    assert.ok(report.toggles > 0, JSON.stringify(reports));
    assert.equal(report.wrong, 0, JSON.stringify(reports));
    assert.deepEqual(report.refused, {}, JSON.stringify(reports));
  }
  return reports;
}

test("isolates: the raced functions' entry jumps change only their first instruction; a thread stopped after it gets the original", () => {
  const { arch } = machine();
  for (const symbol of RACED) {
    const entry = os.symbolAddress(symbol);
    // Where the jump goes: after `endbr64`, in a C library built for CET.
    const address = entry + BigInt(arch.landingPadLength(bytesAt(entry, 16)));
    const before = bytesAt(address, 64);
    const real = ids[symbol]();
    // A thread stopped after the first instruction, as it goes on: that instruction, relocated,
    // then a jump to the second. It runs in this process once the bytes past the first
    // instruction are found unchanged: a jump reaching past it fails the test, not the suite.
    const page = mapPages(1);
    try {
      const plan = arch.planRelocation(before, address, 1);
      const resume = arch.relocate(plan, page);
      runtime.view(page, resume.length).set(resume);
      assert.equal(libc.mprotect(page, BigInt(os.pageSize), PROT_READ | PROT_EXEC), 0);
      os.flushCode(page, resume.length);
      const stopped = runtime.fnPointer(page, { parameters: [], result: "i32" });
      const patch = redefine({ symbol, parameters: [], result: "i32" }, () => real + 1);
      try {
        assert.equal(patch.patchedAddress, address);
        const past = plan.consumed;
        assert.deepEqual(bytesAt(address + BigInt(past), 16), before.subarray(past, past + 16), `${symbol} past its first instruction`);
        assert.equal(ids[symbol](), real + 1, "the patch is live");
        assert.equal(stopped(), real, "the stopped thread finishes the original");
      } finally {
        patch.restore();
      }
    } finally {
      libc.munmap(page, BigInt(os.pageSize));
    }
  }
});

test("isolates: two Workers redefining and restoring the same function at once", () => {
  race("two", "getuid", "getuid");
});

test("isolates: two Workers redefining different functions on one page at once", () => {
  race("two", "getuid", "getgid");
});

test("isolates: the main thread and a Worker redefining the same function at once", () => {
  race("main", "getuid", "getuid");
});

for (const [how, title, why] of [
  ["terminate", "a terminated Worker's JS patch; later Workers (on its stack) and the main thread get the real function", "the next patching restores the dead isolate's bytes"],
  ["close", "a Worker that ends itself leaves no patch behind", "its bytes are back, by its exit handler or by the next patching"],
]) {
  test(`isolates: ${title}`, () => {
    const { real, held, later, main, restored } = fixture("isolates_death.ts", [how]);
    assert.deepEqual(held, { held: true });
    assert.deepEqual(later, later.map(() => ({ value: real })));
    assert.equal(main, real);
    assert.equal(restored, true, why);
  });
}

test("isolates: deno test --parallel, four files mocking getuid with their own values, all pass", () => {
  const child = spawnRuntime(new URL("./fixtures/parallel_mock.ts", import.meta.url), ["4"], 120_000);
  assert.equal(child.status, 0, child.stderr);
  assert.match(child.stdout, /ok \| 4 passed \| 0 failed/, child.stdout);
}, {
  skip: runtimeName === "deno"
    ? undefined
    : runtimeName === "bun"
    ? "bun test runs every file in one isolate"
    : "node --test runs every file in its own process",
});

test("isolates: the registry's rules across isolates — stacking, an inert step aside, OUT_OF_ORDER, restoreAll", () => {
  const seen = fixture("isolates_cross.ts", []);
  const { real } = seen;
  assert.deepEqual(seen.workerHolds, { held: true });
  assert.equal(seen.depth, 1, "the main thread's patch layers on the Worker's");
  assert.equal(seen.mainSees, 7, "each isolate sees its own JS replacement");
  assert.deepEqual(seen.workerSees, { value: 4242 });
  assert.deepEqual(seen.workerRestores, { refused: null }, "a guarded patch under another isolate's steps aside");
  assert.deepEqual(seen.workerSeesAfter, { value: real });
  assert.equal(seen.mainSeesAfter, 7);
  assert.equal(seen.restoredBytes, true, "restoring the top puts the function's own bytes back");
  assert.equal(seen.mainSeesEnd, real);
  assert.deepEqual(seen.workerNative, { held: true });
  assert.deepEqual(seen.nativeUnder, { refused: "OUT_OF_ORDER" }, "a native patch under another isolate's");
  assert.deepEqual(seen.nativeAfter, { refused: null });
  assert.equal(seen.nativeBytes, true);
  assert.deepEqual(seen.workerRestoreAll, { value: real }, "restoreAll() in the Worker restores its own");
  assert.equal(seen.mainKeeps, 11, "and leaves the main thread's");
  assert.deepEqual(seen.mainRestoreAll, { labs: false, value: 5 });
});
