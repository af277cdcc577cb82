/**
 * Benchmarks of the core, each a ratio against the cheapest thing that does the same job, measured
 * in the same run (the machines are noisy: compare ratios, not nanoseconds). Run by `npm run bench`
 * under the three runtimes.
 */
import { redefine } from "../mod.ts";
import type { Patch } from "../mod.ts";
import { platform } from "../platform/mod.ts";
import { writeCode } from "../src/code_memory.ts";
import { jmpAbs } from "../src/arch/x86_64/writer.ts";
import { machine } from "../src/registry.ts";
import { assemble } from "../test/native.ts";
import { compare, report } from "./report.ts";
import type { Row } from "./report.ts";

const { runtime, os } = platform();
const libc = runtime.open("libc.so.6", { labs: { parameters: ["i64"], result: "i64" } });
const x86_64 = runtime.arch === "x86_64" || runtime.arch === "x64";
const rows: Row[] = [];
const labsSignature = { parameters: ["i64"], result: "i64" } as const;

// A call of a function redefined to a JS function, against the minimal hook: the same function
// with a bare absolute jump at its entry straight to a bare runtime callback.
if (x86_64) {
  const labs = os.symbolAddress("labs");
  const identity = (x: bigint) => x;
  const bare = runtime.callback(labsSignature, identity);
  const original = runtime.view(labs, 14).slice();
  const call = () => libc.labs(-5n);
  let patch: { restore(): void } | undefined;
  const minimal = () => writeCode(platform(), [{ address: labs, bytes: jmpAbs(bare.address) }]);
  const unhook = () => writeCode(platform(), [{ address: labs, bytes: original }]);
  const [ours, baseline] = compare(
    {
      setUp: () => (patch = redefine({ symbol: "labs", ...labsSignature }, identity)),
      body: call,
      tearDown: () => patch!.restore(),
    },
    { setUp: minimal, body: call, tearDown: unhook },
    100_000,
  );
  bare.close();
  rows.push({ name: "a call through a JS replacement / the minimal hook", ours, baseline, unit: "ns", goal: { ratio: 1.05 } });
}

// original(...) from JS, against a direct FFI call of the same function before it was patched:
// through a reference taken once, and through the property as the README's examples call it.
{
  let patch: Patch<typeof labsSignature.parameters, "i64"> | undefined;
  let original: (x: bigint) => bigint = () => 0n;
  let sink = 0n;
  const direct = { body: () => (sink += libc.labs(-5n) as bigint) };
  const [ours, baseline] = compare(
    {
      setUp: () => {
        patch = redefine({ symbol: "labs", ...labsSignature }, (x) => x);
        original = patch.original;
      },
      body: () => (sink += original(-5n)),
      tearDown: () => patch!.restore(),
    },
    direct,
    1_000_000,
    21,
  );
  rows.push({ name: "`const f = patch.original; f(...)` / a direct FFI call", ours, baseline, unit: "ns", goal: { ratio: 1.2 } });
  const [property, baseline2] = compare(
    {
      // The first use makes the stub (once per patch); the calls after it are measured.
      setUp: () => void (patch = redefine({ symbol: "labs", ...labsSignature }, (x) => x)).original,
      body: () => (sink += patch!.original(-5n)),
      tearDown: () => patch!.restore(),
    },
    direct,
    1_000_000,
    21,
  );
  rows.push({ name: "`patch.original(...)` / a direct FFI call", ours: property, baseline: baseline2, unit: "ns", goal: { ratio: 1.05 } });
  // The floor of the row above: the unpatched function itself, not our stub, loaded the same way —
  // from a property of an object each round makes afresh (as each round makes its patch), held in a
  // variable the rounds assign — against the same direct call, whose callee the compiler knows.
  let holder = { f: libc.labs };
  const [plain, baseline3] = compare(
    { setUp: () => (holder = { f: libc.labs }), body: () => (sink += holder.f(-5n) as bigint) },
    direct,
    1_000_000,
    21,
  );
  rows.push({
    name: "`holder.f(...)`, the unpatched function in a `{ f }` made each round (the floor of the row above) / a direct FFI call",
    ours: plain,
    baseline: baseline3,
    unit: "ns",
    goal: {},
  });
  if (sink === 0n) throw new Error("unreachable");
}

// One redefine + restore of a native redirect, against ONE bare mprotect pair on the same page
// (what a patcher writing between protection changes pays at the least, twice over).
{
  const getppid = os.symbolAddress("getppid");
  const getpid = os.symbolAddress("getpid");
  const page = getppid - getppid % BigInt(os.pageSize);
  const protection = os.mappingAt(page)!.protection;
  const [ours, baseline] = compare(
    { body: () => redefine({ symbol: "getppid", parameters: [], result: "i32" }, getpid).restore() },
    {
      body: () => {
        os.protect(page, os.pageSize, protection | 2);
        os.protect(page, os.pageSize, protection);
      },
    },
    200,
  );
  rows.push({
    name: "one `redefine` + `restore` (native redirect) / one bare `mprotect` pair, same page",
    ours: ours / 1000,
    baseline: baseline / 1000,
    unit: "µs",
    goal: { ratio: 1.0 },
  });
  // What of it is the kernel's: the same two 8-byte stores, bare, the way writeCode makes them
  // (Linux: each between an mprotect pair, `Os.protectFrom`; taking the write permission back
  // with other threads about costs a TLB flush on the other cores), and the forced way, which
  // Linux no longer takes (it tears under threads running the code: README, Not guaranteed).
  const word = getppid - getppid % 8n;
  const before = runtime.view(word, 8).slice();
  const jumped = before.slice();
  jumped.set(machine().arch.entryJumps[0].encode(getppid, getpid)!, Number(getppid - word));
  const [ours2, writes] = compare(
    { body: () => redefine({ symbol: "getppid", parameters: [], result: "i32" }, getpid).restore() },
    {
      body: () => {
        writeCode(platform(), [{ address: word, bytes: jumped }]);
        writeCode(platform(), [{ address: word, bytes: before }]);
      },
    },
    200,
  );
  rows.push({
    name: "the same / its two bare writes, the way the layer makes them (`writeCode`; Linux: an `mprotect` pair each)",
    ours: ours2 / 1000,
    baseline: writes / 1000,
    unit: "µs",
    goal: {},
  });
  if (os.forceWrite(word, before)) {
    const [ours3, forced] = compare(
      { body: () => redefine({ symbol: "getppid", parameters: [], result: "i32" }, getpid).restore() },
      { body: () => void (os.forceWrite(word, jumped) && os.forceWrite(word, before)) },
      200,
    );
    rows.push({
      name: "the same / its two bare writes the forced way (`Os.forceWrite`: /proc/self/mem; not taken, see README)",
      ours: ours3 / 1000,
      baseline: forced / 1000,
      unit: "µs",
      goal: {},
    });
  }
}

// A native redirect called from a native loop, against the loop calling the replacement directly:
// the entry jump reaches the replacement (same page), so the redirect costs one `jmp rel32`.
if (x86_64) {
  const loop = [
    0x53, //                   push rbx
    0x41, 0x54, //             push r12
    0x48, 0x83, 0xec, 0x08, // sub rsp, 8: calls made with an aligned stack
    0x48, 0x89, 0xfb, //       mov rbx, rdi: the function
    0x49, 0x89, 0xf4, //       mov r12, rsi: how many calls
  ];
  const body = [
    0x4c, 0x89, 0xe7, //       again: mov rdi, r12
    0xff, 0xd3, //             call rbx
    0x49, 0xff, 0xcc, //       dec r12
  ];
  const code = [
    ...loop,
    ...body,
    0x75, -(body.length + 2) & 0xff, // jnz again
    0x48, 0x83, 0xc4, 0x08, //          add rsp, 8
    0x41, 0x5c, //                      pop r12
    0x5b, //                            pop rbx
    0xc3, //                            ret
  ];
  const F = 64, G = 80, J = 96;
  const le32 = (n: number) => [0, 8, 16, 24].map((shift) => (n >> shift) & 0xff);
  const functions = [
    ...code, ...Array(F - code.length).fill(0xcc),
    0x48, 0x8d, 0x47, 0x01, 0xc3, ...Array(11).fill(0xcc), // f: lea rax, [rdi+1]; ret
    0x48, 0x8d, 0x47, 0x02, 0xc3, ...Array(11).fill(0xcc), // g: lea rax, [rdi+2]; ret
    // j: jmp g, written by hand: what one `jmp rel32` costs on this processor, with nothing of ours.
    0xe9, ...le32(G - (J + 5)), ...Array(11).fill(0xcc),
  ];
  const { address } = assemble(functions);
  const f = address + BigInt(F), g = address + BigInt(G), j = address + BigInt(J);
  const run = runtime.fnPointer(address, { parameters: ["usize", "u64"], result: "void" });
  // 13 ms a round: well above the timer's resolution.
  const CALLS = 10_000_000;
  let patch: { restore(): void } | undefined;
  const [ours, baseline] = compare(
    {
      setUp: () => (patch = redefine({ address: f, size: 16, parameters: ["i64"], result: "i64" }, g)),
      body: () => run(f, BigInt(CALLS)),
      tearDown: () => patch!.restore(),
    },
    { body: () => run(g, BigInt(CALLS)) },
    1,
  );
  rows.push({
    name: "a native redirect called from a native loop / the loop calling the replacement",
    ours: ours / CALLS,
    baseline: baseline / CALLS,
    unit: "ns",
    goal: { ratio: 1.05 },
  });
  // The floor of the row above: the processor's price of a taken jump between call and callee.
  const [jumped, direct] = compare({ body: () => run(j, BigInt(CALLS)) }, { body: () => run(g, BigInt(CALLS)) }, 1);
  rows.push({
    name: "the same loop calling a hand-written `jmp rel32` to the replacement / calling it (the floor)",
    ours: jumped / CALLS,
    baseline: direct / CALLS,
    unit: "ns",
    goal: {},
  });
}

report(rows);
