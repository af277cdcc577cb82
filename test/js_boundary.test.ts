/**
 * Issue 12 §4, results and exceptions at the JS boundary: a JS replacement's result is checked
 * against its signature on both runtimes; a wrong type or a throw gives the native caller 0 and
 * surfaces as an uncaught error once the current synchronous JS has run; replacements that cannot
 * answer synchronously (async functions, generators) or cannot be called (classes) are refused.
 */
import { assert, assertCode, test } from "./harness.ts";
import { redefine, restoreAll } from "../mod.ts";
import { runCase, snapshot } from "./cases.ts";
import { libc, os } from "./native.ts";

const fixture = new URL("./fixtures/js_results.ts", import.meta.url);

interface ResultReport {
  report: { type: string; value: string; got: string; ok: boolean; errors: string[]; bad: boolean }[];
  unchanged: boolean;
}

test("a JS replacement's result is checked against the signature: what it cannot hold gives 0 and BAD_REPLACEMENT", () => {
  const { report, unchanged } = runCase(fixture, "results of the wrong type") as ResultReport;
  for (const { type, value, got, ok, errors, bad } of report) {
    assert.ok(ok, `${type} ← ${value}: the native caller got ${got}`);
    assert.deepEqual(errors, bad ? ["BAD_REPLACEMENT"] : [], `${type} ← ${value}: ${errors.join(", ")}`);
  }
  assert.ok(unchanged, "bytes and protection restored");
});

test("a JS replacement that throws: the native caller gets 0, later calls run it, each error surfaces once", () => {
  assert.deepEqual(runCase(fixture, "replacements that throw"), {
    direct: { got: 0, errors: ["Error: boom1"] },
    firstFails: { got: 7, errors: ["Error: boom2"] },
    bothFail: { got: 0, errors: ["Error: boom4", "Error: boom5"] },
    recovered: { got: 7, errors: [] },
    calls: 6,
    unchanged: true,
  });
});

test("async functions, generators and classes as replacements: BAD_REPLACEMENT, nothing written", () => {
  const getppid = os.symbolAddress("getppid");
  const before = snapshot([getppid]);
  const target = { symbol: "getppid", parameters: [], result: "i32" } as const;
  const refused: [string, unknown][] = [
    ["async function", async function () {
      return await Promise.resolve(1);
    }],
    ["async arrow", async () => await Promise.resolve(1)],
    ["generator", function* () {
      yield 1;
    }],
    ["async generator", async function* () {
      yield 1;
    }],
    ["class", class {
      constructor() {}
    }],
    ["bound async function", (async () => await Promise.resolve(1)).bind(null)],
  ];
  for (const [kind, replacement] of refused) {
    try {
      assertCode(() => redefine(target, replacement as never), "BAD_REPLACEMENT");
    } finally {
      restoreAll();
    }
    assert.equal(snapshot([getppid]), before, `${kind}: nothing written`);
  }
  assert.equal(libc.getppid(), libc.getppid());
});

test("plain functions, arrows, bound functions and methods are still taken", () => {
  const target = { symbol: "getppid", parameters: [], result: "i32" } as const;
  const holder = {
    value: 11,
    method(): number {
      return 11;
    },
  };
  for (const replacement of [function (): number {
    return 11;
  }, () => 11, holder.method.bind(holder), holder.method]) {
    const patch = redefine(target, replacement);
    try {
      assert.equal(libc.getppid(), 11);
    } finally {
      patch.restore();
    }
  }
});
