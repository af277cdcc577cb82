import { assert, assertCode, test } from "./harness.ts";
import { redefine, transaction, wrap } from "../mod.ts";
import { bytesAt, libc, os } from "./native.ts";

const labs = { symbol: "labs", library: "libc.so.6", parameters: ["i64"], result: "i64" } as const;

test("wrap: the replacement made from the original is what every native caller gets, until restore", () => {
  const before = bytesAt(os.symbolAddress("labs", "libc.so.6"), 16);
  {
    let given: unknown;
    using patch = wrap(labs, (original) => {
      given = original;
      return (x) => original(x) * 2n;
    });
    assert.equal(given, patch.original, "the replacement's original is the patch's own, the fast stub");
    assert.equal(libc.labs(-21n), 42n, "the native caller runs the replacement, which ran the real labs");
    assert.equal(patch.original(-21n), 21n, "the patch's original is the real labs");
    assert.notEqual(patch.originalAddress, patch.address, "through a trampoline");
  }
  assert.equal(libc.labs(-21n), 21n, "restored at the end of the scope");
  assert.deepEqual(bytesAt(os.symbolAddress("labs", "libc.so.6"), 16), before, "byte for byte");
});

test("wrap: the replacement is made once, before the entry jump is written, and may call the original already", () => {
  let made = 0;
  const patch = wrap(labs, (original) => {
    made++;
    assert.equal(libc.labs(-3n), 3n, "not redefined yet while the replacement is made");
    const offset = original(-1n);
    return (x) => original(x) + offset;
  });
  try {
    assert.equal(libc.labs(-3n), 4n);
    assert.equal(libc.labs(-4n), 5n);
    assert.equal(made, 1);
  } finally {
    patch.restore();
  }
});

test("wrap: a replacement that returns no function of the signature, or throws, is refused and nothing is written", () => {
  const before = bytesAt(os.symbolAddress("labs", "libc.so.6"), 16);
  assertCode(() => wrap(labs, () => undefined as never), "BAD_REPLACEMENT", /not undefined/);
  assertCode(() => wrap(labs, () => ((x: bigint, y: bigint) => x + y) as never), "BAD_REPLACEMENT", /one of 2/);
  assertCode(() => wrap(labs, () => (async (x: bigint) => await x) as never), "BAD_REPLACEMENT", /AsyncFunction/);
  assert.throws(() =>
    wrap(labs, () => {
      throw new RangeError("no replacement today");
    }), RangeError);
  assert.deepEqual(bytesAt(os.symbolAddress("labs", "libc.so.6"), 16), before);
  assert.equal(libc.labs(-5n), 5n);
  using again = wrap(labs, (original) => (x) => original(x) * 3n);
  assert.ok(again.active);
  assert.equal(libc.labs(-5n), 15n, "nothing left behind in the way of the next patch");
});

test("wrap inside a transaction: live when it commits, with its original already bound", () => {
  const patch = transaction(() => {
    const inner = wrap(labs, (original) => (x) => original(x) - 1n);
    assert.equal(libc.labs(-8n), 8n, "not written until the transaction commits");
    return inner;
  });
  try {
    assert.equal(libc.labs(-8n), 7n);
    assert.equal(patch.original(-8n), 8n);
  } finally {
    patch.restore();
  }
  assert.equal(libc.labs(-8n), 8n);
});

test("wrap layered on a redefinition: its original is the replacement below", () => {
  const below = redefine(labs, () => 100n);
  try {
    const above = wrap(labs, (original) => (x) => original(x) + 1n);
    try {
      assert.equal(libc.labs(-1n), 101n);
      assert.equal(above.depth, 1);
    } finally {
      above.restore();
    }
    assert.equal(libc.labs(-1n), 100n);
  } finally {
    below.restore();
  }
  assert.equal(libc.labs(-1n), 1n);
});
