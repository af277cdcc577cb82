// The process-wide store's identity word (src/shared_registry.ts): non-zero while its isolate
// lives, whatever its JS thread's pointer reads as. Each store here is opened beside this
// isolate's own, as a second copy of redefine in it would be.
import { assert, assertCode, test } from "./harness.ts";
import { openStore } from "../src/shared_registry.ts";
import { machine } from "../src/registry.ts";
import { runtime } from "./native.ts";

const unread = (): bigint => {
  throw new Error("this store's identity is not asked for here");
};

function openBeside(threadPointer = unread) {
  const m = machine();
  return openStore(m.platform, m.pool, m.arch, threadPointer, () => {
    throw new Error("these stores never take the lock");
  });
}

const wordOf = (identity: bigint) => new BigInt64Array(runtime.view(identity, 8).slice().buffer)[0];

test("identity word: a thread pointer read as 0 or 1 is refused, and the word still says the isolate lives", () => {
  const other = openBeside();
  for (const read of [0n, 1n]) {
    const store = openBeside(() => read);
    assertCode(() => store.ownIdentity(), "UNSUPPORTED_PLATFORM", new RegExp(`pointer read as ${read},`));
    assert.equal(wordOf(store.identity), 1n, "the word as it was before the read");
    assert.equal(other.alive(store.identity), true, "another copy takes the isolate for alive");
  }
});

test("identity word: once read, it holds the JS thread's pointer, read once", () => {
  let reads = 0;
  const pointer = 0x7f00_0000_2000n;
  const store = openBeside(() => (reads++, pointer));
  assert.equal(wordOf(store.identity), 1n, "alive before any read");
  assert.equal(store.ownIdentity(), store.identity);
  assert.equal(store.ownIdentity(), store.identity);
  assert.equal(wordOf(store.identity), pointer);
  assert.equal(reads, 1);
});
