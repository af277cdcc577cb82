/**
 * The order of a patch's writes (issue 12 §3: the original exists before the entry jump is live)
 * and transactions that undo their own work (§6): each nets out to exactly the bytes it should.
 */
import { assert, assertCode, test } from "./harness.ts";
import { redefine, restoreAll, transaction } from "../mod.ts";
import type { Patch } from "../mod.ts";
import { runCase, snapshot } from "./cases.ts";
import { assemble, bytesAt, isArm64, libc, mapCodeFile, mapPages, os, runtime, unassemble, words } from "./native.ts";
import { PROT_EXEC, PROT_READ, PROT_WRITE } from "../platform/mod.ts";

const fixture = new URL("./fixtures/original_first.ts", import.meta.url);

const labsTarget = { symbol: "labs", parameters: ["i64"], result: "i64" } as const;

test("originalSlot: holds the original before the entry is written; the first call goes through it", () => {
  assert.deepEqual(runCase(fixture, "slot filled before the entry"), {
    slotInBody: true,
    entryUntouchedInBody: true,
    labs: "6n",
    slotIsOriginal: true,
    slotIsFunctionAfterRestore: true,
    unchanged: true,
  });
});

test("originalSlot: a native open hook calling its original while the runtime and redefine call open", () => {
  assert.deepEqual(runCase(fixture, "open hooked natively, its original through the slot"), {
    fd: true,
    readsFiles: true,
    slotIsOriginal: true,
    unchanged: true,
  });
});

test("a native replacement's trampoline is made before the entry jump goes live", () => {
  assert.deepEqual(runCase(fixture, "open hooked natively, originalAddress read after"), { fd: true, unchanged: true });
});

// Prologues the relocators refuse: x86-64 code branching back into the first 5 bytes; on arm64 an
// instruction it does not know (FEAT_CMPBR's cb<cc>).
const UNRELOCATABLE = isArm64 ? words(0x7423a005, 0xd65f03c0, 0xd65f03c0, 0xd65f03c0) : [
  0x31, 0xc0, //             xor eax, eax
  0x48, 0xff, 0xc0, //       loop: inc rax
  0x48, 0x39, 0xf8, //       cmp rax, rdi
  0x75, 0xf8, //             jne loop (back to offset 2, inside the first 5 bytes)
  0xc3, //                   ret
  0xcc, 0xcc, 0xcc, 0xcc, 0xcc, // int3 padding
];

test("originalSlot with an unrelocatable prologue: UNRELOCATABLE before anything is written", () => {
  const { address, base } = assemble(UNRELOCATABLE);
  const slot = mapPages(1);
  try {
    const before = snapshot([address]);
    const target = { address, size: UNRELOCATABLE.length, parameters: ["i64"], result: "i64", originalSlot: slot } as const;
    try {
      assertCode(() => redefine(target, os.symbolAddress("labs")), "UNRELOCATABLE");
    } finally {
      restoreAll();
    }
    assert.equal(snapshot([address]), before, "entry bytes and protection unchanged");
    assert.deepEqual([...runtime.view(slot, 8)], [0, 0, 0, 0, 0, 0, 0, 0], "the slot is not written");
  } finally {
    libc.munmap(slot, BigInt(os.pageSize));
    unassemble(base);
  }
});

test("originalSlot that is not writable memory, or not a pointer-aligned bigint: INVALID_ADDRESS, nothing written", () => {
  const labs = os.symbolAddress("labs");
  const before = snapshot([labs]);
  const writable = mapPages(1);
  const readOnly = assemble([0xc3]).base;
  try {
    for (const slot of [0n, readOnly, writable + 3n, 2n ** 64n, -8n, 8 as unknown as bigint]) {
      const target = { ...labsTarget, originalSlot: slot };
      try {
        assertCode(() => redefine(target, os.symbolAddress("labs")), "INVALID_ADDRESS");
      } finally {
        restoreAll();
      }
      assert.equal(snapshot([labs]), before, `slot ${slot}: nothing written`);
    }
    assert.deepEqual([...runtime.view(writable, 8)], [0, 0, 0, 0, 0, 0, 0, 0]);
  } finally {
    libc.munmap(writable, BigInt(os.pageSize));
    unassemble(readOnly);
  }
});

test("transaction: a patch made and restored inside one nets out to nothing written", () => {
  const labs = os.symbolAddress("labs");
  const before = snapshot([labs]);
  let patch: { active: boolean } | undefined;
  try {
    transaction(() => {
      const made = redefine(labsTarget, (x) => x);
      made.restore();
      patch = made;
    });
  } finally {
    restoreAll();
  }
  assert.equal(patch!.active, false);
  assert.equal(snapshot([labs]), before);
  assert.equal(libc.labs(-3n), 3n);
});

test("transaction: restoreAll() inside one that also made a patch nets out to nothing written", () => {
  const labs = os.symbolAddress("labs");
  const getppid = os.symbolAddress("getppid");
  const before = snapshot([labs, getppid]);
  const outside = redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => 4242);
  let inside: { active: boolean } | undefined;
  try {
    transaction(() => {
      inside = redefine(labsTarget, () => 1n);
      restoreAll();
    });
  } finally {
    restoreAll();
  }
  assert.equal(outside.active, false, "the patch made before the transaction is restored too");
  assert.equal(inside!.active, false);
  assert.equal(snapshot([labs, getppid]), before);
  assert.equal(libc.labs(-3n), 3n);
});

test("transaction: made, restored and made again inside one: the last patch is live, the entry written once", () => {
  const labs = os.symbolAddress("labs");
  const before = snapshot([labs]);
  try {
    const last = transaction(() => {
      redefine(labsTarget, () => 1n).restore();
      return redefine(labsTarget, () => 2n);
    });
    assert.equal(last.active, true);
    assert.equal(libc.labs(-3n), 2n);
    last.restore();
  } finally {
    restoreAll();
  }
  assert.equal(snapshot([labs]), before);
});

test("nested transaction that throws, caught by the outer body: the inner rolls back, the outer commits", () => {
  const labs = os.symbolAddress("labs");
  const getppid = os.symbolAddress("getppid");
  const before = snapshot([labs, getppid]);
  const real = libc.getppid() as number;
  let inner: { active: boolean } | undefined;
  try {
    const outer = transaction(() => {
      const made = redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => 4242);
      assert.throws(() =>
        transaction(() => {
          inner = redefine(labsTarget, () => 1n);
          throw new Error("inner fails");
        }), /inner fails/);
      return made;
    });
    assert.equal(outer.active, true, "the outer transaction's patch is committed");
    assert.equal(libc.getppid(), 4242);
    assert.equal(inner!.active, false, "the inner transaction's patch is rolled back");
    assert.equal(libc.labs(-3n), 3n);
    outer.restore();
  } finally {
    restoreAll();
  }
  assert.equal(snapshot([labs, getppid]), before);
  assert.equal(libc.getppid(), real);
});

test("nested transaction that throws after restoring an outer patch: that patch stays live", () => {
  const labs = os.symbolAddress("labs");
  const before = snapshot([labs]);
  try {
    const outer = transaction(() => {
      const made = redefine(labsTarget, () => 7n);
      assert.throws(() =>
        transaction(() => {
          made.restore();
          throw new Error("inner fails");
        }), /inner fails/);
      return made;
    });
    assert.equal(outer.active, true);
    assert.equal(libc.labs(-3n), 7n);
    outer.restore();
  } finally {
    restoreAll();
  }
  assert.equal(snapshot([labs]), before);
});

test("nested transaction that succeeds joins the outer one: both commit together", () => {
  const labs = os.symbolAddress("labs");
  const getppid = os.symbolAddress("getppid");
  const before = snapshot([labs, getppid]);
  try {
    const [a, b] = transaction(() => {
      const a = redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => 4242);
      const b = transaction(() => redefine(labsTarget, () => 1n));
      assert.equal(snapshot([labs, getppid]), before, "nothing written before the outer commit");
      return [a, b];
    });
    assert.ok(a.active && b.active);
    assert.equal(libc.labs(-3n), 1n);
  } finally {
    restoreAll();
  }
  assert.equal(snapshot([labs, getppid]), before);
});

const unmapFixture = new URL("./fixtures/unmap_in_tx.ts", import.meta.url);
const x86Posix = { skip: !isArm64 && runtime.os !== "windows" ? undefined : "the fixture's code is x86-64, assembled with mmap" };

test("a transaction whose body unmaps code it redefined, or a function met before between two redefines in its mapping: INVALID_ADDRESS at commit, nothing written or read, the rest rolled back", () => {
  for (const name of ["redefined, then unmapped in the body", "redefined twice in one mapping met before, unmapped between"]) {
    const seen = runCase(unmapFixture, name) as Record<string, unknown>;
    assert.match(String(seen.message), /is not mapped: nothing was written/, name);
    assert.deepEqual({ ...seen, message: "" }, { error: "INVALID_ADDRESS", message: "", bystander: "rolled back", untouched: true, works: true, left: "none" }, name);
  }
}, x86Posix);

test("a transaction whose body unmaps a patched function, then restores it: UNLOADED, nothing read, the rest rolled back", () => {
  const seen = runCase(unmapFixture, "restore after the body unmapped the mapping an earlier call found") as Record<string, unknown>;
  assert.match(String(seen.message), /its code is gone/);
  assert.deepEqual({ ...seen, message: "" }, { error: "UNLOADED", message: "", bystander: "rolled back", untouched: true, works: true, left: "none" });
}, x86Posix);

test("a transaction whose body unmaps a function between two redefines in its mapping: INVALID_ADDRESS, nothing read, the rest rolled back", () => {
  for (const name of ["redefined twice in one mapping, unmapped between", "redefined to its original twice in one mapping, unmapped between"]) {
    const seen = runCase(unmapFixture, name) as Record<string, unknown>;
    assert.match(String(seen.message), /is not mapped, so it is not code/, name);
    assert.deepEqual({ ...seen, message: "" }, { error: "INVALID_ADDRESS", message: "", bystander: "rolled back", untouched: true, works: true, left: "none" }, name);
  }
}, x86Posix);

test("a transaction whose body maps other code over a function met before, between two redefines in its mapping: PATCH_MODIFIED at commit; run again, it patches the new code", () => {
  const seen = runCase(unmapFixture, "redefined twice in one mapping met before, other code mapped between") as Record<string, unknown>;
  assert.match(String(seen.message), /changed while the transaction's body ran, or since redefine last read it .*Nothing was written/);
  assert.deepEqual(
    { ...seen, message: "" },
    { error: "PATCH_MODIFIED", message: "", bystander: "rolled back", untouched: true, works: true, left: "none", again: true },
  );
}, x86Posix);

test("a transaction whose body unmaps a native replacement it redirected to: BAD_REPLACEMENT at commit, nothing written", () => {
  const seen = runCase(unmapFixture, "redefined to a native replacement the body unmaps") as Record<string, unknown>;
  assert.match(String(seen.message), /the replacement 0x[0-9a-f]+ is no longer mapped .*nothing was written/);
  assert.deepEqual({ ...seen, message: "" }, { error: "BAD_REPLACEMENT", message: "", bystander: "rolled back", untouched: true, works: true, left: "none" });
}, x86Posix);

test("a transaction whose body redefines to a native replacement, restores it and unmaps the replacement: nothing written, no error", () => {
  const seen = runCase(unmapFixture, "redefined to a native replacement, restored, then the replacement unmapped");
  assert.deepEqual(seen, { error: "none", message: "", untouched: true, works: true, left: "none" });
}, x86Posix);

test("a transaction whose body restores a patch, then unmaps its originalSlot: restored, the slot left alone", () => {
  const seen = runCase(unmapFixture, "restored in a body that then unmaps its originalSlot");
  assert.deepEqual(seen, { error: "none", message: "", restored: true, works: true, left: "none" });
}, x86Posix);

test("a transaction whose body makes a patch, unmaps its originalSlot and throws: rolled back, the slot left alone", () => {
  const seen = runCase(unmapFixture, "made in a body that unmaps its originalSlot, then throws");
  assert.deepEqual(seen, { error: "Error: the body fails", message: "the body fails", bystander: "rolled back", untouched: true, works: true, left: "none" });
}, x86Posix);

test("a nested transaction whose body makes a patch, unmaps its originalSlot and throws: it rolls back, the outer commits", () => {
  const seen = runCase(unmapFixture, "made in a nested body that unmaps its originalSlot, then throws");
  assert.deepEqual(seen, { error: "none", message: "", bystander: "live", untouched: true, works: true, left: "none" });
}, x86Posix);

test("a transaction's body that makes data executable between two redefines: the second takes it as the replacement", () => {
  const { address, base } = assemble([...IDENTITY, ...IDENTITY]);
  const page = mapPages(1);
  runtime.view(page, IDENTITY.length).set(IDENTITY);
  const target = { address, size: 16, parameters: ["i64"], result: "i64" } as const;
  try {
    const patch = transaction(() => {
      // Asked while the page is data: refused, and the section has seen it so.
      assertCode(() => redefine(target, page), "INVALID_ADDRESS");
      assert.equal(libc.mprotect(page, BigInt(os.pageSize), PROT_READ | PROT_EXEC), 0);
      return redefine(target, page);
    });
    assert.equal(patch.active, true);
    patch.restore();
  } finally {
    restoreAll();
    libc.munmap(page, BigInt(os.pageSize));
    unassemble(base);
  }
}, x86Posix);

test("a transaction of native redirects in one mapping asks the map about once a patch, its restoreAll() a few times", () => {
  const count = 64;
  // Two mappings of 32 functions each.
  const { address, base } = assemble(Array.from({ length: count / 2 }, () => IDENTITY).flat());
  const second = assemble(Array.from({ length: count / 2 }, () => IDENTITY).flat());
  const half = count / 2;
  const addresses = Array.from({ length: count }, (_, i) => i < half ? address + 16n * BigInt(i) : second.address + 16n * BigInt(i - half));
  const labs = os.symbolAddress("labs");
  const query = os.mappingAt;
  let queries = 0;
  os.mappingAt = (at) => (queries++, query(at));
  try {
    transaction(() => addresses.map((at) => redefine({ address: at, size: 16, parameters: ["i64"], result: "i64" }, labs)));
    const made = queries;
    queries = 0;
    restoreAll();
    // Each redefine asks where its target is (user code ran since the call before); the commit
    // asks once more about each mapping written and about the replacement's; restoreAll's own
    // restores share what they find.
    assert.ok(made >= count && made <= count + 8, `${made} queries for ${count} patches`);
    assert.ok(queries <= 8, `${queries} queries for ${count} restores`);
  } finally {
    os.mappingAt = query;
    restoreAll();
    unassemble(base);
    unassemble(second.base);
  }
}, x86Posix);

// A body may also leave other code where it redefined or is to restore: write the entry itself,
// or unmap the code and have other code mapped at the same address with the same protection
// (Node maps a binding's call code on its first call, into a hole just left as readily as
// anywhere). The map then reads as it did; the commit compares the bytes before it writes.
/** `mov rax, rdi; ret` (arm64: `mov x0, x0; ret`), padded to 16 bytes. */
const IDENTITY = isArm64
  ? words(0xaa0003e0, 0xd65f03c0, 0xd503201f, 0xd503201f)
  : [0x48, 0x89, 0xf8, 0xc3, ...Array(12).fill(0x90)];
/** `mov rax, 7; ret` (arm64: `mov x0, #7; ret`), padded to 16 bytes: the other code. */
const SEVEN = isArm64
  ? words(0xd28000e0, 0xd65f03c0, 0xd503201f, 0xd503201f)
  : [0x48, 0xc7, 0xc0, 0x07, 0x00, 0x00, 0x00, 0xc3, ...Array(8).fill(0x90)];
const MAP_PRIVATE_ANONYMOUS_FIXED = 0x02 | 0x20 | 0x10;

/** The two ways of leaving `code` at `address` in the pages `assemble` mapped at `base`, whose range and protection stay as they were. */
const CHANGES: readonly [string, (base: bigint, address: bigint, code: readonly number[]) => void][] = [
  ["wrote the entry through a writable mapping", (base, address, code) => {
    assert.equal(libc.mprotect(base, BigInt(2 * os.pageSize), PROT_READ | PROT_WRITE), 0);
    runtime.view(address, code.length).set(code);
    assert.equal(libc.mprotect(base, BigInt(2 * os.pageSize), PROT_READ | PROT_EXEC), 0);
  }],
  ["unmapped the code and mapped other code there", (base, address, code) => {
    const size = BigInt(2 * os.pageSize);
    assert.equal(libc.mmap(base, size, PROT_READ | PROT_WRITE, MAP_PRIVATE_ANONYMOUS_FIXED, -1, 0n), base);
    runtime.view(address, code.length).set(code);
    assert.equal(libc.mprotect(base, size, PROT_READ | PROT_EXEC), 0);
  }],
];

const call = (address: bigint) => runtime.fnPointer(address, { parameters: ["i64"], result: "i64" });

test("a transaction layering two patches on one function, and one restoring both: each write after the first at a place expects what the one before it writes", () => {
  const { address, base } = assemble(IDENTITY);
  const target = { address, size: 16, parameters: ["i64"], result: "i64" } as const;
  try {
    const [a, b] = transaction(() => [redefine(target, os.symbolAddress("labs")), redefine(target, (x) => x + 1n)]);
    assert.deepEqual([a.active, b.active], [true, true]);
    assert.equal(call(address)(-5n), -4n, "the newer patch answers");
    transaction(() => {
      b.restore();
      a.restore();
    });
    assert.deepEqual([a.active, b.active], [false, false]);
    assert.deepEqual([...bytesAt(address, 16)], IDENTITY);
  } finally {
    restoreAll();
    unassemble(base);
  }
});

/**
 * Two IDENTITY functions in one mapping of a file (as a library's), or of anonymous memory, each
 * redefined and restored once (met before), and their targets.
 */
function metBefore(file = true) {
  const { address, base } = assemble([...IDENTITY, ...IDENTITY]);
  if (file) mapCodeFile([...IDENTITY, ...IDENTITY], base);
  const second = address + BigInt(IDENTITY.length);
  const target = (a: bigint) => ({ address: a, size: 16, parameters: ["i64"], result: "i64" }) as const;
  transaction(() => [redefine(target(address), os.symbolAddress("labs")), redefine(target(second), os.symbolAddress("labs"))]);
  restoreAll();
  return { address, second, base, target };
}

/** How many times the second of two redefines in one transaction's body asks the map, and what the whole transaction asked. */
function queriesOfSecond(first: () => unknown, second: () => unknown): { inBody: number; asked: bigint[] } {
  const mappingAt = os.mappingAt;
  const asked: bigint[] = [];
  let inBody = -1;
  try {
    os.mappingAt = (at, was) => {
      asked.push(at);
      return mappingAt.call(os, at, was);
    };
    transaction(() => {
      first();
      const before = asked.length;
      second();
      inBody = asked.length - before;
    });
  } finally {
    os.mappingAt = mappingAt;
  }
  return { inBody, asked };
}

for (const file of [true, false]) {
  test(
    file
      ? "a transaction's later redefine in a mapping it has found, of a function met before in a file's mapping: laid out from what was read there, no query in the body; the commit asks the map"
      : "the same in anonymous memory: the code is read again, after asking the map",
    () => {
      const { address, second, base, target } = metBefore(file);
      const labs = os.symbolAddress("labs");
      try {
        const patches: Patch<readonly ["i64"], "i64">[] = [];
        const { inBody, asked } = queriesOfSecond(
          () => patches.push(redefine(target(address), labs)),
          () => patches.push(redefine(target(second), labs)),
        );
        if (file) assert.equal(inBody, 0, "the second redefine asked nothing of the map");
        else assert.ok(inBody >= 1, `the second redefine asked the map ${inBody} times`);
        assert.ok(asked.some((at) => at >= base && at < base + BigInt(2 * os.pageSize)), "the map was asked of the functions' mapping");
        assert.deepEqual(patches.map((p) => p.active), [true, true]);
        assert.equal(call(second)(-5n), 5n, "the second answers as labs");
        assert.equal(patches[1]!.original(-5n), -5n, "its original runs the function");
        restoreAll();
        assert.deepEqual([...bytesAt(second, 16)], IDENTITY);
      } finally {
        restoreAll();
        unassemble(base);
      }
    },
  );
}

test("a function rewritten between two transactions, its memory the same: the second refuses PATCH_MODIFIED at commit, nothing written; run again, it patches the new code", () => {
  const { address, second, base, target } = metBefore();
  const labs = os.symbolAddress("labs");
  try {
    CHANGES[0]![1](base, second, SEVEN);
    const before = snapshot([address, second]);
    const both = () => transaction(() => [redefine(target(address), labs), redefine(target(second), labs)]);
    assertCode(
      both,
      "PATCH_MODIFIED",
      new RegExp(`code at 0x${second.toString(16)} changed while the transaction's body ran, or since redefine last read it.*Nothing was written`),
    );
    assert.equal(snapshot([address, second]), before, "nothing written, protections as they were");
    assert.equal(call(second)(5n), 7n);
    const patches = both();
    assert.deepEqual(patches.map((p) => p.active), [true, true]);
    assert.equal(call(second)(-5n), 5n, "the new code patched");
    assert.equal(patches[1]!.original(5n), 7n, "its original is the new code");
    restoreAll();
    assert.deepEqual([...bytesAt(second, 16)], SEVEN);
  } finally {
    restoreAll();
    unassemble(base);
  }
});

for (const [how, change] of CHANGES) {
  test(`a transaction whose body redefined a function, then ${how}: PATCH_MODIFIED at commit, nothing written, the rest rolled back`, () => {
    const { address, base } = assemble(IDENTITY);
    const other = assemble(IDENTITY);
    const labs = os.symbolAddress("labs");
    const mapping = os.mappingAt(address)!;
    const beforeOther = snapshot([other.address]);
    let patches: { active: boolean }[] = [];
    try {
      assertCode(
        () =>
          transaction(() => {
            patches = [redefine({ address: other.address, size: 16, parameters: ["i64"], result: "i64" }, labs)];
            patches.push(redefine({ address, size: 16, parameters: ["i64"], result: "i64" }, labs));
            change(base, address, SEVEN);
          }),
        "PATCH_MODIFIED",
        new RegExp(`code at 0x${address.toString(16)} changed while the transaction's body ran.*Nothing was written`),
      );
      const now = os.mappingAt(address)!;
      assert.deepEqual([now.start, now.end, now.protection], [mapping.start, mapping.end, mapping.protection], "the map reads as it did");
      assert.deepEqual([...bytesAt(address, 16)], SEVEN, "the body's code stays, no entry jump over it");
      assert.equal(call(address)(5n), 7n);
      assert.deepEqual(patches.map((p) => p.active), [false, false], "both patches rolled back");
      assert.equal(snapshot([other.address]), beforeOther, "the other function untouched");
      // Nothing is left registered: the place can be redefined and restored again.
      const again = redefine({ address, size: 16, parameters: ["i64"], result: "i64" }, labs);
      assert.equal(call(address)(-5n), 5n);
      again.restore();
      assert.deepEqual([...bytesAt(address, 16)], SEVEN);
    } finally {
      restoreAll();
      unassemble(base);
      unassemble(other.base);
    }
  });

  test(`a transaction whose body restored a patch, then ${how}: PATCH_MODIFIED at commit, nothing written, the patch kept`, () => {
    const { address, base } = assemble(IDENTITY);
    const labs = os.symbolAddress("labs");
    const patch = redefine({ address, size: 16, parameters: ["i64"], result: "i64" }, labs);
    const jump = bytesAt(address, 16);
    try {
      assertCode(
        () =>
          transaction(() => {
            patch.restore();
            change(base, address, SEVEN);
          }),
        "PATCH_MODIFIED",
        /changed while the transaction's body ran.*Nothing was written/,
      );
      assert.deepEqual([...bytesAt(address, 16)], SEVEN, "the body's code stays: its bytes are not put back over it");
      assert.equal(patch.active, true, "the restore rolled back");
      // What the patch wrote, back where it was: its restore then finds its jump and puts the function back.
      change(base, address, [...jump]);
      patch.restore();
      assert.deepEqual([...bytesAt(address, 16)], IDENTITY);
    } finally {
      restoreAll();
      unassemble(base);
    }
  });
}
