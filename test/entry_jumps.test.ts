/**
 * The entry jump's form follows the memory a stub can have: the shortest form whose reach holds
 * some, the next one out when nearer memory is taken (qemu-user's own mappings, which the guest's
 * maps do not show, can fill the ±128 MiB around arm64's libc), and FUNCTION_TOO_SHORT when the
 * function has no room for the form that reaches. The pool is made to refuse what is nearer
 * than a form's reach, the way a full address space does.
 */
import { assert, assertCode, test } from "./harness.ts";
import { redefine, returns } from "../mod.ts";
import { redefineToOriginal } from "../src/internal.ts";
import { layers, machine } from "../src/registry.ts";
import type { EntryJump } from "../src/arch/types.ts";
import { assemble, bytesAt, isArm64, libc, os, protectionAt, runtime, unassemble, words } from "./native.ts";
import { FORTY_TWO, withFortyTwoAnywhere, withNearMemoryTaken } from "./near_memory.ts";

const jumps = machine().arch.entryJumps;

/** abs(x) in hand-assembled code of exactly `length` bytes (`nop`s before its `ret`). */
function absOf(length: number): number[] {
  const body = isArm64
    ? words(
      0xf100001f, // cmp x0, #0
      0xda805400, // cneg x0, x0, mi
    )
    : [
      0x48, 0x89, 0xf8, //       mov rax, rdi
      0x48, 0xf7, 0xd8, //       neg rax
      0x48, 0x0f, 0x48, 0xc7, // cmovs rax, rdi
    ];
  const nop = isArm64 ? words(0xd503201f) : [0x90];
  const ret = isArm64 ? words(0xd65f03c0) : [0xc3];
  const nops = (length - body.length - ret.length) / nop.length;
  assert.ok(Number.isInteger(nops) && nops >= 0, `abs fits ${length} bytes`);
  return [...body, ...Array.from({ length: nops }, () => nop).flat(), ...ret];
}

/** Where a copy of `FORTY_TWO` lies after each abs, in reach of any jump. */
const NEIGHBOUR = 256;

/** The live patch of `address` as the registry has it: its entry jump and where it leads. */
function entryOf(address: bigint): { written: Uint8Array; destination: bigint } {
  return layers(address).at(-1)!;
}

/** Asserts that `address` holds the entry jump `jump` to where the patch leads, and nothing else changed. */
function assertJump(address: bigint, before: Uint8Array, jump: EntryJump): bigint {
  const { written, destination } = entryOf(address);
  assert.equal(written.length, jump.size, `the ${jump.size}-byte entry jump`);
  assert.deepEqual(written, jump.encode(address, destination), "the form's own encoding, to where the patch leads");
  const now = bytesAt(address, before.length);
  assert.deepEqual(now.subarray(0, jump.size), written, "written at the entry");
  assert.deepEqual(now.subarray(jump.size), before.subarray(jump.size), "nothing past it");
  return destination;
}

/** Asserts that `to` is out of the reach of the entry jump `nearer` placed at `address`. */
function assertFar(address: bigint, to: bigint, nearer: EntryJump): void {
  const distance = to > address ? to - address : address - to;
  assert.ok(distance > nearer.reach, `${to} is beyond the ${nearer.size}-byte jump's reach`);
}

/** Runs `body` on `abs` of `length` bytes; asserts its bytes and page protection come back exactly. */
function onAbs(length: number, body: (address: bigint, call: (x: bigint) => bigint) => void): void {
  const { address, base } = assemble([...absOf(length), ...Array(NEIGHBOUR - length).fill(0), ...FORTY_TWO]);
  try {
    const before = bytesAt(address, NEIGHBOUR);
    const protection = protectionAt(address);
    const call = runtime.fnPointer(address, { parameters: ["i64"], result: "i64" }) as (x: bigint) => bigint;
    body(address, call);
    assert.deepEqual(bytesAt(address, NEIGHBOUR), before, "code bytes restored exactly");
    assert.equal(protectionAt(address), protection, "page protection restored exactly");
    assert.equal(call(-7n), 7n);
  } finally {
    unassemble(base);
  }
}

/** The forms past the first, each with the memory nearer than it taken. */
for (let form = 1; form < jumps.length; form++) {
  const jump = jumps[form]!;
  const nearer = jumps[form - 1]!;
  const what = `${jump.size}-byte entry jump when no memory is within the ${nearer.size}-byte one's reach`;
  const target = (address: bigint) => ({ address, size: jump.size, parameters: ["i64"], result: "i64" }) as const;

  test(`the ${what}: a JS replacement, a native redirect, canned code and the original`, () => {
    onAbs(jump.size, (address, call) => {
      const before = bytesAt(address, NEIGHBOUR);
      withNearMemoryTaken(address, nearer.reach, () => {
        const js = redefine(target(address), (x) => x * 10n);
        assertFar(address, assertJump(address, before, jump), nearer);
        assert.equal(call(-7n), -70n);
        assert.equal(js.original(-7n), 7n, "the original through the trampoline");
        js.restore();
        assert.deepEqual(bytesAt(address, NEIGHBOUR), before);

        // Out of the nearer form's reach, so through a stub.
        withFortyTwoAnywhere(address, (far) => {
          assertFar(address, far, nearer);
          const native = redefine(target(address), far);
          assertFar(address, assertJump(address, before, jump), nearer);
          assert.equal(call(-7n), 4242n);
          assert.equal(native.original(-7n), 7n);
          native.restore();
        });

        // In reach of the nearest form: a direct jump, and a trampoline wherever memory is.
        const neighbour = address + BigInt(NEIGHBOUR);
        const direct = redefine(target(address), neighbour);
        assertJump(address, before, jumps[0]);
        assert.equal(entryOf(address).destination, neighbour);
        assert.equal(call(-7n), 4242n);
        assert.equal(direct.original(-7n), 7n);
        direct.restore();

        const canned = redefine(target(address), returns(5n));
        assertFar(address, assertJump(address, before, jump), nearer);
        assert.equal(call(-7n), 5n);
        assert.equal(canned.original(-7n), 7n);
        canned.restore();

        const original = redefineToOriginal(target(address));
        assert.equal(assertJump(address, before, jump), original.originalAddress, "straight to the trampoline");
        assert.equal(call(-7n), 7n);
        assert.equal(call(9n), 9n);
        original.restore();
      });
    });
  });

  test(`the ${what}: a function shorter than it is refused, naming every form`, () => {
    // Told by `size`: a whole abs takes 12 bytes on arm64.
    const short = jump.size - (isArm64 ? 4 : 1);
    onAbs(jump.size, (address, call) => {
      const before = bytesAt(address, NEIGHBOUR);
      withNearMemoryTaken(address, nearer.reach, () => {
        const forms = jumps.map((j, i) => `${j.size}${i === 0 ? " bytes" : ""} (within ±\\d+ [MG]iB|anywhere)`);
        assertCode(
          () => redefine({ ...target(address), size: short }, (x) => x * 10n),
          "FUNCTION_TOO_SHORT",
          new RegExp(`only ${short} bytes.*fewer than the ${jump.size}.*${forms.join(", ")}`),
        );
        assert.deepEqual(bytesAt(address, NEIGHBOUR), before, "nothing written");
        assert.equal(call(-7n), 7n);
      });
    });
  });
}

test("arm64 libc's labs (12 bytes) with no memory within ±128 MiB: the adrp jump", () => {
  const address = os.symbolAddress("labs", "libc.so.6");
  const size = os.symbolAt(address)!.size;
  const before = bytesAt(address, 16);
  const protection = protectionAt(address);
  assert.equal(size, 12, "glibc's aarch64 labs is cmp, cneg, ret");
  withNearMemoryTaken(address, jumps[0].reach, () => {
    const labs = { symbol: "labs", library: "libc.so.6", parameters: ["i64"], result: "i64" } as const;
    const patch = redefine(labs, (x) => x * 10n);
    try {
      assertFar(address, assertJump(address, before, jumps[1]!), jumps[0]);
      assert.equal(libc.labs(-7n), -70n);
      assert.equal(patch.original(-7n), 7n);
    } finally {
      patch.restore();
    }
  });
  assert.deepEqual(bytesAt(address, 16), before, "code bytes restored exactly");
  assert.equal(protectionAt(address), protection, "page protection restored exactly");
  assert.equal(libc.labs(-7n), 7n);
}, { skip: isArm64 ? undefined : "arm64 only" });
