import { assert, assertCode, test } from "./harness.ts";
import { attach } from "../mod.ts";
import { bytesAt, callOnAnotherThread, cstr, libc, os, runtime } from "./native.ts";
import { loadImportLibrary } from "./import_library.ts";

const strtol = { symbol: "strtol", library: "libc.so.6", parameters: ["pointer", "pointer", "i32"], result: "i64" } as const;

test("attach: onEnter and onLeave see one call's arguments, the same array, and onLeave replaces the result", () => {
  const address = os.symbolAddress("strtol", "libc.so.6");
  const bytes = bytesAt(address, 32);
  const entered: unknown[][] = [];
  const left: [bigint, unknown[]][] = [];
  {
    using probe = attach(strtol, {
      onEnter(args) {
        entered.push(args);
      },
      onLeave(result, args) {
        left.push([result, args]);
        return result * 2n;
      },
    });
    // libc's atoi calls strtol(text, NULL, 10) inside libc: a native caller.
    assert.equal(libc.atoi(cstr("21")), 42);
    assert.equal(libc.atoi(cstr("-4")), -8);
    assert.equal(probe.calls, 2);
    assert.equal(probe.active, true);
  }
  assert.equal(entered.length, 2);
  assert.equal(entered[0][1], 0n, "endptr is NULL");
  assert.equal(entered[0][2], 10, "base 10");
  assert.equal(typeof entered[0][0], "bigint", "the text as an address");
  assert.deepEqual(left.map(([result]) => result), [21n, -4n], "onLeave gets the original's result");
  assert.ok(left[0][1] === entered[0], "the same args array in onEnter and onLeave");
  assert.equal(libc.atoi(cstr("21")), 21, "restored at the end of the scope");
  assert.deepEqual(bytesAt(address, 32), bytes, "bytes restored exactly");
});

test("attach: a probe without onLeave, or one returning undefined, keeps the result", () => {
  {
    using probe = attach(strtol, {});
    assert.equal(libc.atoi(cstr("123")), 123);
    assert.equal(probe.calls, 1);
  }
  {
    using probe = attach(strtol, { onLeave: () => undefined });
    assert.equal(libc.atoi(cstr("77")), 77);
    assert.equal(probe.calls, 1);
  }
});

test("attach: onEnter may change an argument before the original sees it", () => {
  using _probe = attach(strtol, {
    onEnter(args) {
      args[2] = 16; // atoi's base 10 becomes 16
    },
  });
  assert.equal(libc.atoi(cstr("ff")), 255);
});

test("attach: a call from another thread goes straight to the original, unseen", () => {
  const labs = { symbol: "labs", library: "libc.so.6", parameters: ["i64"], result: "i64" } as const;
  using probe = attach(labs, { onLeave: () => 7n });
  assert.equal(libc.labs(-5n), 7n, "the JS thread's call is probed");
  // The other thread calls labs(record address): the real labs gives the address back.
  const fromThread = callOnAnotherThread(os.symbolAddress("labs", "libc.so.6"));
  assert.notEqual(fromThread, 7n);
  assert.ok(fromThread > 0n);
  assert.equal(probe.calls, 1, "the other thread's call is not counted");
});

test("attach: a call made while a callback runs goes to the original, unseen", () => {
  const inner: bigint[] = [];
  using probe = attach(strtol, {
    onEnter() {
      inner.push(BigInt(libc.atoi(cstr("5"))));
    },
  });
  assert.equal(libc.atoi(cstr("9")), 9);
  assert.deepEqual(inner, [5n], "the re-entrant atoi ran the original strtol");
  assert.equal(probe.calls, 1);
});

test("attach: callbacks that are not functions are refused before anything is written", () => {
  const address = os.symbolAddress("strtol", "libc.so.6");
  const bytes = bytesAt(address, 16);
  assertCode(() => attach(strtol, null as never), "BAD_REPLACEMENT", /onEnter/);
  assertCode(() => attach(strtol, { onEnter: 1 } as never), "BAD_REPLACEMENT", /onEnter must be a function/);
  assertCode(() => attach(strtol, { onLeave: "x" } as never), "BAD_REPLACEMENT", /onLeave must be a function/);
  assert.deepEqual(bytesAt(address, 16), bytes);
});

test("attach with callers: only the calls that library makes through its import slot are probed", () => {
  const lib = loadImportLibrary(runtime, os, "attach_callers_");
  const labs = { symbol: "labs", library: "libc.so.6", parameters: ["i64"], result: "i64", callers: lib.path } as const;
  {
    using probe = attach(labs, { onLeave: (result) => result + 1000n });
    assert.equal(lib.labs(-5n), 1005n, "the library's call is probed");
    assert.equal(libc.labs(-5n), 5n, "the program's own call is not");
    assert.equal(probe.calls, 1);
  }
  assert.equal(lib.labs(-5n), 5n, "the slot restored");
});
