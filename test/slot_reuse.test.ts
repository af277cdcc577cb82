// A function patched again, laid out the same way, takes back the slot its last patch left in
// quarantine (the relocated first instructions, and the stub's code, still in place) instead of
// relocating into a fresh one; every patch still calls the right replacement and original, and
// restores the exact bytes.
import { assert, test } from "./harness.ts";
import { redefine } from "../mod.ts";
import { redefineToOriginal } from "../src/internal.ts";
import { bytesAt, isArm64, libc, os } from "./native.ts";

const labs = { symbol: "labs", library: "libc.so.6", parameters: ["i64"], result: "i64" } as const;
const getppid = { symbol: "getppid", library: "libc.so.6", parameters: [], result: "i32" } as const;
const parent = libc.getppid() as number, pid = libc.getpid() as number;

test("slot reuse: a native redirect patched again gets its last trampoline back, and it still runs the original", () => {
  const at = os.symbolAddress("getppid", "libc.so.6");
  const bytes = bytesAt(at, 32);
  const first = redefine(getppid, { symbol: "getpid" });
  const trampoline = first.originalAddress;
  assert.equal(first.original(), parent);
  first.restore();
  const second = redefine(getppid, { symbol: "getpid" });
  assert.equal(second.originalAddress, trampoline, "the same trampoline, taken back");
  assert.equal(libc.getppid(), pid, "redirected");
  assert.equal(second.original(), parent, "the original, through it");
  second.restore();
  assert.equal(libc.getppid(), parent);
  assert.deepEqual(bytesAt(at, 32), bytes, "code bytes restored exactly");
});

test("slot reuse: a JS replacement patched again reaches its new callback (x86-64: through the guard taken back; arm64: a fresh slot)", () => {
  const address = os.symbolAddress("labs", "libc.so.6");
  const bytes = bytesAt(address, 32);
  const first = redefine(labs, (x) => x + 1n);
  const trampoline = first.originalAddress;
  assert.equal(libc.labs(1n), 2n);
  first.restore();
  const second = redefine(labs, (x) => x + 2n);
  // x86-64's calling guard is the same code for every patch (its record is in the data); arm64's
  // guard holds its callback in its code, and gets a fresh slot.
  if (!isArm64) assert.equal(second.originalAddress, trampoline, "the same slot, taken back");
  assert.equal(libc.labs(1n), 3n, "the new replacement runs");
  assert.equal(second.original(-6n), 6n);
  second.restore();
  assert.equal(libc.labs(-7n), 7n);
  assert.deepEqual(bytesAt(address, 32), bytes, "code bytes restored exactly");
});

test("slot reuse: a patch laid out another way gets a fresh slot, and takes back its own next time", () => {
  const at = os.symbolAddress("getppid", "libc.so.6");
  const bytes = bytesAt(at, 32);
  const native = redefine(getppid, { symbol: "getpid" });
  const trampoline = native.originalAddress;
  native.restore();
  const toOriginal = redefineToOriginal(getppid);
  const own = toOriginal.originalAddress;
  assert.notEqual(own, trampoline, "not the lone trampoline's slot");
  assert.equal(libc.getppid(), parent, "runs its own trampoline");
  toOriginal.restore();
  const back = redefineToOriginal(getppid);
  assert.equal(back.originalAddress, own, "its own slot, taken back");
  assert.equal(libc.getppid(), parent);
  back.restore();
  assert.deepEqual(bytesAt(at, 32), bytes, "code bytes restored exactly");
});
