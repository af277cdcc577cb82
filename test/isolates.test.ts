// One process, many isolates: Workers, and `deno test --parallel` files, each load their own copy
// of redefine. The cases run in child processes (test/fixtures/isolates_*.ts, parallel_mock.ts),
// so a crash is a failed test, not a dead suite.
import { assert, fixtureJson, runtimeName, spawnRuntime, test } from "./harness.ts";
import { redefine } from "../mod.ts";
import { hexBytes } from "../src/errors.ts";
import { machine } from "../src/registry.ts";
import { PROT_EXEC, PROT_READ } from "../platform/mod.ts";
import { bytesAt, libc, mapPages, os, runtime } from "./native.ts";

/**
 * The functions the races redefine while other isolates call them (test/fixtures/isolate_job.ts),
 * with the arguments they are called with there. A thread that has run a function's first
 * instruction when another thread's entry jump goes live resumes at the second, in the middle of
 * the jump when the jump reaches past the first (README, "Not guaranteed"): racing glibc's `labs`
 * (a 3-byte `mov rax, rdi` first) killed Bun's main thread once in a 2-core CI run, an illegal
 * instruction at labs+3 while the Worker's patch landed. So each one's first instruction must be
 * at least as long as the shortest entry jump (`firstInstruction` checks it before a race): in
 * glibc x86-64 `getuid`'s and `getgid`'s is `mov eax, N` and `ffsl`'s `mov eax, -1`, 5 bytes, the
 * near jump's length (an arm64 `b` is always one instruction). `ffsl` takes a 64-bit argument,
 * whose lowest set bit lies above its low 32 bits.
 */
const RACED = {
  getuid: { parameters: [], result: "i32" },
  getgid: { parameters: [], result: "i32" },
  ffsl: { parameters: ["i64"], result: "i32" },
} as const;
type Raced = keyof typeof RACED;
const ARGUMENTS: Record<Raced, readonly bigint[]> = { getuid: [], getgid: [], ffsl: [3n << 36n] };
const ids = runtime.open("libc.so.6", RACED);

/** Runs test/fixtures/`name` under this runtime; the last line of JSON it printed. */
function fixture(name: string, args: string[], timeout = 30_000) {
  return fixtureJson(new URL(`./fixtures/${name}`, import.meta.url), args, timeout);
}

/**
 * Where `symbol`'s entry jump goes (after `endbr64`, in a C library built for CET), its bytes
 * from there, and its first instruction as this project's decoder reads it. Fails the test when
 * that instruction is shorter than the shortest entry jump: a race on it would test the known
 * window, not the library.
 */
function firstInstruction(symbol: Raced) {
  const { arch } = machine();
  const entry = os.symbolAddress(symbol);
  const address = entry + BigInt(arch.landingPadLength(bytesAt(entry, 16)));
  const code = bytesAt(address, 64);
  const plan = arch.planRelocation(code, address, 1);
  const jump = arch.entryJumps[0].size;
  assert.ok(
    plan.consumed >= jump,
    `${symbol}'s first instruction here is ${plan.consumed} bytes (${hexBytes(code.subarray(0, plan.consumed))}), shorter than the ${jump}-byte entry jump: a thread past it would resume inside another isolate's jump (README, "Not guaranteed"), so a race on it tests that known window; race a function whose first instruction is at least ${jump} bytes in this C library (see RACED).`,
  );
  return { address, code, plan };
}

interface Report {
  toggles: number;
  wrong: number;
  refused: Record<string, number>;
}

function race(where: "two" | "main", first: Raced, second: Raced): Report[] {
  firstInstruction(first);
  firstInstruction(second);
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
  for (const symbol of Object.keys(RACED) as Raced[]) {
    const { address, code: before, plan } = firstInstruction(symbol);
    const args = ARGUMENTS[symbol];
    const real = ids[symbol](...args);
    // A thread stopped after the first instruction, as it goes on: that instruction, relocated,
    // then a jump to the second. It runs in this process once the bytes past the first
    // instruction are found unchanged: a jump reaching past it fails the test, not the suite.
    const page = mapPages(1);
    try {
      const resume = arch.relocate(plan, page);
      runtime.view(page, resume.length).set(resume);
      assert.equal(libc.mprotect(page, BigInt(os.pageSize), PROT_READ | PROT_EXEC), 0);
      os.flushCode(page, resume.length);
      const stopped = runtime.fnPointer(page, RACED[symbol]);
      const patch = redefine({ symbol, ...RACED[symbol] } as never, () => real + 1);
      try {
        assert.equal(patch.patchedAddress, address);
        const past = plan.consumed;
        assert.deepEqual(bytesAt(address + BigInt(past), 16), before.subarray(past, past + 16), `${symbol} past its first instruction`);
        assert.equal(ids[symbol](...args), real + 1, "the patch is live");
        assert.equal(stopped(...args), real, "the stopped thread finishes the original");
      } finally {
        patch.restore();
      }
    } finally {
      libc.munmap(page, BigInt(os.pageSize));
    }
  }
});

test("isolates: two Workers redefining and restoring the same function at once", () => {
  race("two", "ffsl", "ffsl");
});

test("isolates: two Workers redefining different functions on one page at once", () => {
  race("two", "getuid", "getgid");
});

test("isolates: the main thread and a Worker redefining the same function at once", () => {
  race("main", "ffsl", "ffsl");
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
