import { assert, assertCode, runtimeName, runtimePath, test } from "./harness.ts";
import { redefine, redefineAll, restoreAll, transaction } from "../mod.ts";
import {
  assemble,
  bytesAt,
  isArm64,
  libc,
  os,
  protectionAt,
  runtime,
  unassemble,
  unwritableCode,
  words,
  writableExecutable,
} from "./native.ts";
import { execFileSync } from "node:child_process";

/** The code bytes and protections of `addresses`, to compare before and after. */
function state(addresses: bigint[]) {
  return addresses.map((a) => ({ bytes: [...bytesAt(a, 16)].join(), protection: protectionAt(a) }));
}

test("stacking: a second redefine layers on the first; its original is the first replacement", () => {
  const labs = os.symbolAddress("labs");
  const before = state([labs]);
  const inner = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x): bigint => inner.original(x) + 1n);
  const outer = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x): bigint => outer.original(x) * 10n);
  try {
    assert.equal(libc.labs(-5n), 60n, "outer(inner(labs))");
    assert.equal(outer.depth, 1);
    assertCode(() => inner.restore(), "OUT_OF_ORDER", /newer patch first/);
    assert.equal(libc.labs(-5n), 60n, "a refused restore changes nothing");
    outer.restore();
    assert.equal(libc.labs(-5n), 6n, "back to the inner patch alone");
    inner.restore();
    assert.equal(libc.labs(-5n), 5n);
  } finally {
    restoreAll();
  }
  assert.deepEqual(state([labs]), before);
});

test("restoreAll unwinds stacks newest first, in one transaction", () => {
  const labs = os.symbolAddress("labs");
  const before = state([labs]);
  redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, () => 1n);
  redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, { symbol: "getpid" });
  redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, () => 3n);
  assert.equal(libc.labs(-5n), 3n);
  restoreAll();
  assert.deepEqual(state([labs]), before);
  assert.equal(libc.labs(-5n), 5n);
});

test("stacking in one transaction: a patch restored and one made again; restoring the new one leaves the function's bytes", () => {
  const labs = os.symbolAddress("labs");
  const before = state([labs]);
  const first = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, () => 1n);
  const second = transaction(() => {
    first.restore();
    return redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x): bigint => second.original(x) + 2n);
  });
  try {
    assert.equal(first.active, false);
    assert.equal(second.depth, 0, "the restored patch is not under it");
    assert.equal(libc.labs(-5n), 7n, "its original is labs itself");
    second.restore();
    assert.deepEqual(state([labs]), before);
    assert.equal(libc.labs(-5n), 5n);
  } finally {
    restoreAll();
  }
});

test("a replacement that restores its own patch while it runs: its code stays until it returns", () => {
  let calls = 0;
  const patch = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, () => {
    calls++;
    patch.restore();
    // Patching again from inside must not reuse the code this call is still running in.
    redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => 7).restore();
    return 42n;
  });
  assert.equal(libc.labs(-1n), 42n);
  assert.equal(patch.active, false);
  assert.equal(libc.labs(-1n), 1n, "restored");
  assert.equal(calls, 1);
});

test("transaction: all or nothing when the commit fails half-way", () => {
  const names = ["getppid", "labs"];
  const addresses = names.map((n) => os.symbolAddress(n));
  const before = state(addresses);
  const wx = writableExecutable();
  let made: { active: boolean }[] = [];
  const unwritable = unwritableCode();
  try {
    assertCode(() =>
      transaction(() => {
        made = [
          redefine({ symbol: "getppid", parameters: [], result: "i32" }, { symbol: "getpid" }),
          redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => x),
          // mprotect refuses this page: the whole transaction fails at commit.
          redefine({ address: unwritable, size: 64, parameters: [], result: "void" }, () => {}),
        ];
      }), "PROTECT_FAILED");
  } finally {
    libc.munmap(unwritable, BigInt(os.pageSize));
  }
  assert.deepEqual(state(addresses), before, "every byte and protection as before");
  assert.ok(made.every((p) => !p.active), "no patch of the failed transaction is active");
  assert.deepEqual(writableExecutable(), wx);
  assert.equal(libc.labs(-2n), 2n);
});

test("transaction: an error inside the body writes nothing", () => {
  const labs = os.symbolAddress("labs");
  const before = state([labs]);
  assertCode(() =>
    transaction(() => {
      redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => x);
      redefine({ symbol: "no_such_function_xyz", parameters: [], result: "void" }, () => {});
    }), "SYMBOL_NOT_FOUND");
  assert.deepEqual(state([labs]), before);
});

test("transaction: one protection change per run of pages, not two per patch", () => {
  // 64 small functions on two pages, patched and restored in one transaction each.
  const body = isArm64
    ? words(0xd65f03c0, 0xd4200000, 0xd4200000, 0xd4200000) // ret (x0 is the argument); brk #0 ×3
    : [0x48, 0x89, 0xf8, 0xc3, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc];
  const { address, base } = assemble(Array.from({ length: 64 }, () => body).flat(), 0);
  const protect = os.protect;
  const forceWrite = os.forceWrite;
  const calls: string[] = [];
  os.protect = (start, length, protection) => {
    calls.push(`${start.toString(16)}+${length}:${protection}`);
    protect(start, length, protection);
  };
  // The protecting path, as where /proc/self/mem is refused (with it there are no protection changes).
  os.forceWrite = () => false;
  try {
    const targets = Array.from({ length: 64 }, (_, i) => address + BigInt(16 * i));
    const patches = redefineAll(
      targets.map((a) => [{ address: a, size: 16, parameters: ["i64"], result: "i64" }, os.symbolAddress("labs")] as const),
    );
    assert.equal(calls.length, 2, `one open and one close for the page run: ${calls.join(" ")}`);
    const f = runtime.fnPointer(targets[63], { parameters: ["i64"], result: "i64" });
    assert.equal(f(-4n), 4n, "the last one is redefined to labs");
    calls.length = 0;
    transaction(() => patches.forEach((p) => p.restore()));
    assert.equal(calls.length, 2);
    assert.equal(f(-4n), -4n);
  } finally {
    os.protect = protect;
    os.forceWrite = forceWrite;
    unassemble(base);
  }
});

test("W^X: after every public operation, no new writable+executable mapping", () => {
  const wx = writableExecutable();
  const steps: [string, () => void][] = [];
  let a: { restore(): void; original: unknown } | undefined;
  steps.push(["redefine (JS)", () => (a = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => x))]);
  steps.push(["original()", () => (a!.original as (x: bigint) => bigint)(-1n)]);
  steps.push(["redefine (native, stacked)", () => redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, { symbol: "getpid" })]);
  steps.push(["restoreAll", () => restoreAll()]);
  steps.push(["transaction", () => transaction(() => redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => 1))]);
  steps.push(["restoreAll again", () => restoreAll()]);
  for (const [name, step] of steps) {
    step();
    assert.deepEqual(writableExecutable(), wx, `after ${name}`);
  }
});

test("bad input: mid-instruction address, our own stubs", () => {
  // labs starts with a 3-byte mov on x86-64, a 4-byte word on arm64; +1 is inside it.
  const labs = os.symbolAddress("labs");
  assertCode(() => redefine({ address: labs + 1n, parameters: ["i64"], result: "i64" }, (x) => x), "INVALID_ADDRESS", /inside an instruction/);
  const patch = redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, (x) => x);
  try {
    assertCode(
      () => redefine({ address: patch.originalAddress, size: 16, parameters: ["i64"], result: "i64" }, (x) => x),
      "INVALID_ADDRESS",
      /own stubs/,
    );
  } finally {
    patch.restore();
  }
});

test("a function already hooked by someone else (entry is a jump): patched on top, their hook kept", () => {
  // The "foreign hook": target's entry jumps to `other`, which returns 7; our original goes there.
  // Both in one mapping, 16 bytes apart, so the short jump reaches on both CPUs.
  const target = assemble([
    ...(isArm64 ? words(...Array(4).fill(0xd4200000)) : Array(16).fill(0xcc)), // brk #0 / int3
    ...(isArm64 ? words(0x528000e0, 0xd65f03c0) : [0xb8, 0x07, 0, 0, 0, 0xc3]), // other: mov w0/eax, 7; ret
  ]);
  const jump = isArm64
    ? words(0x14000004) // b +16 (other)
    : [0xe9, 0x0b, 0, 0, 0]; // jmp +11 (other, 16 bytes from the entry)
  libc.mprotect(target.base, BigInt(os.pageSize), 7);
  runtime.view(target.address, jump.length).set(jump);
  libc.mprotect(target.base, BigInt(os.pageSize), 5);
  os.flushCode(target.address, jump.length);
  try {
    const f = runtime.fnPointer(target.address, { parameters: [], result: "i32" });
    assert.equal(f(), 7);
    const patch = redefine({ address: target.address, size: 16, parameters: [], result: "i32" }, (): number => patch.original() * 6);
    try {
      assert.equal(f(), 42, "our replacement, calling their hook as the original");
    } finally {
      patch.restore();
    }
    assert.equal(f(), 7);
  } finally {
    unassemble(target.base);
  }
});

test("patches are restored when the process exits normally", () => {
  const fixture = new URL("./fixtures/exit_restore.ts", import.meta.url).pathname;
  const bin = runtimePath;
  const out = execFileSync(bin, runtimeName === "deno" ? ["run", "-A", "--no-check", fixture] : [fixture], { encoding: "utf8" });
  assert.match(out, /patched true/);
  assert.match(out, /restored at exit true/);
});
