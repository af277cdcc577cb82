/**
 * JS replacements of functions the VM calls behind the program's back: V8 calls `getpid` from its
 * executable during garbage collection (Deno and Node), where entering JS aborts the process; the
 * guard sends every call returning into the runtime's executable, outside its FFI's part, to the
 * original. Each case runs in a child process (test/fixtures/vm_calls.ts) so that an abort is a
 * failed test; the program's own FFI calls must still reach every JS layer.
 */
import { assert, runtimeName, runtimePath, test } from "./harness.ts";
import { execFileSync } from "node:child_process";
import { redefine } from "../mod.ts";
import { machine } from "../src/registry.ts";
import { assemble, isArm64, libc, mapPages, os, runtime, unassemble, words } from "./native.ts";

const fixture = new URL("./fixtures/vm_calls.ts", import.meta.url).pathname;

/**
 * Runs one case of the fixture under this runtime and gives its counts. `v8Flags` go to V8 (Deno
 * and Node); execFileSync throws when the child aborts or exits with an error.
 */
function child(name: string, v8Flags: string[] = []): Record<string, number> {
  const args = runtimeName === "deno"
    ? ["run", "-A", "--no-check", ...(v8Flags.length ? [`--v8-flags=${v8Flags.join(",")}`] : []), fixture, name]
    : runtimeName === "node"
    ? ["--no-warnings", ...v8Flags, fixture, name]
    : [fixture, name];
  const out = execFileSync(runtimePath, args, { encoding: "utf8", timeout: 120_000 });
  return JSON.parse(out.trim().split("\n").at(-1)!);
}

test("a JS getpid replacement survives 1.5 million allocations; the program's FFI calls all reach it", () => {
  const { calls, reached, answered } = child("getpid");
  assert.equal(answered, calls, "every FFI getpid() the program made returned the replacement's value");
  assert.equal(reached, calls, "and nothing else reached it: the VM's own calls went to the original");
});

test("a stacked pair of JS getpid replacements under allocation: the VM's calls bypass both layers", () => {
  const { calls, top, bottom, answered } = child("stacked");
  assert.equal(answered, calls, "the top layer's value, built on the bottom one's through original");
  assert.equal(top, calls);
  assert.equal(bottom, calls);
});

// Deno calls strlen while dispatching every callback: the guard's busy flag and the runtime-code
// rule both send it to the original. V8's garbage collector also calls snprintf, whose strlen calls
// come from inside libc, where no guard can tell them from the program's: a young generation larger
// than these cases allocate keeps that out of them (README: caveats). And V8's concurrent compiler
// threads call strlen all the time: under Node 26, any patch of strlen (a JS one, or one that only
// runs the trampoline) crashed a compiler thread in a few runs in a hundred on this loaded machine,
// which Deno never did; these cases are about the JS thread, so the compiler stays on it.
const STRLEN_FLAGS = ["--min-semi-space-size=128", "--no-concurrent-recompilation"];

test("a JS strlen replacement: the runtime's strlen calls while dispatching it do not recurse", () => {
  const { calls, reached, answered } = child("strlen", STRLEN_FLAGS);
  assert.equal(answered, calls);
  // A libc function the runtime calls for the program (dlsym, say) may call strlen too: that
  // call comes from libc, so it reaches the replacement.
  assert.ok(reached >= calls && reached <= calls + 4, `${reached} calls reached it`);
});

test("a stacked pair of JS strlen replacements: each layer runs once per call, nothing recurses", () => {
  const { calls, top, bottom, answered } = child("stackedStrlen", STRLEN_FLAGS);
  assert.equal(answered, calls);
  assert.ok(top >= calls && top <= calls + 4, `${top} calls reached the top layer`);
  assert.equal(bottom, top, "every call through the top layer's original reached the bottom one");
});

test("a JS clock_gettime replacement under allocation: the runtime keeps its own clock, Date.now() runs on", () => {
  const { calls, reached, answered, dateRan } = child("clockGettime");
  assert.equal(answered, calls);
  assert.equal(reached, calls, "only the program's calls reached it: not V8's, not Bun's Date.now()");
  assert.equal(dateRan, 1);
});

test("the runtime's code as the guard sees it: the executable's text, and the FFI's part only where libffi is inside", () => {
  using _ = redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => 1);
  const code = machine().runtimeCode!;
  const text = os.programText?.() ?? null;
  if (runtime.os !== "linux") return assert.deepEqual(code, { start: 0n, end: 0n, ffiStart: 0n, ffiEnd: 0n });
  assert.ok(text && text.start < text.end);
  assert.deepEqual([code.start, code.end], [text.start, text.end]);
  const mapping = os.mappingAt(text.start);
  assert.ok(mapping && (mapping.protection & 4) !== 0, "the text is executable");
  if (runtimeName === "bun") {
    // Bun's FFI calls come from JIT code: none of its executable is the FFI's.
    assert.deepEqual([code.ffiStart, code.ffiEnd], [0n, 0n]);
  } else {
    // libffi inside the executable: a small part of it, two pages around the call instructions.
    assert.ok(code.ffiStart > code.start && code.ffiEnd < code.end);
    assert.ok(code.ffiEnd - code.ffiStart < 16_384n, `${code.ffiEnd - code.ffiStart} bytes`);
  }
});

test("every way the program's FFI calls (0, 1, 3 and 6 integer arguments, a double) reaches a JS replacement", () => {
  // Bound afresh on Deno and Bun, so that the first calls take the runtime's slow path (libffi) and
  // later ones its fast path (JIT code). Node gives back the functions of test/native.ts's `libc`
  // where the signature is the same (getppid, labs: its one library a path keeps them), which
  // other tests may have made hot already; the others are new.
  const own = runtime.open("libc.so.6", {
    getppid: { parameters: [], result: "i32" },
    labs: { parameters: ["i64"], result: "i64" },
    strtol: { parameters: ["buffer", "pointer", "i32"], result: "i64" },
    splice: { parameters: ["i32", "pointer", "i32", "pointer", "usize", "u32"], result: "isize" },
    ldexp: { parameters: ["f64", "i32"], result: "f64" },
  });
  const seen = { getppid: 0, labs: 0, strtol: 0, splice: 0, ldexp: 0 };
  const patches = [
    redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => (seen.getppid++, 7)),
    redefine({ symbol: "labs", parameters: ["i64"], result: "i64" }, () => (seen.labs++, 8n)),
    redefine({ symbol: "strtol", parameters: ["pointer", "pointer", "i32"], result: "i64" }, () => (seen.strtol++, 9n)),
    redefine(
      { symbol: "splice", parameters: ["i32", "pointer", "i32", "pointer", "usize", "u32"], result: "isize" },
      () => (seen.splice++, 10n),
    ),
    redefine({ symbol: "ldexp", library: "libc.so.6", parameters: ["f64", "i32"], result: "f64" }, () => (seen.ldexp++, 11)),
  ];
  const text = new TextEncoder().encode("12\0");
  const N = 3000;
  try {
    for (let i = 0; i < N; i++) {
      assert.equal(own.getppid!(), 7);
      assert.equal(own.labs!(-3n), 8n);
      assert.equal(own.strtol!(text, 0n, 10), 9n);
      assert.equal(own.splice!(-1, 0n, -1, 0n, 0n, 0), 10n);
      assert.equal(own.ldexp!(1.5, 2), 11);
    }
  } finally {
    for (const patch of patches.reverse()) patch.restore();
  }
  assert.deepEqual(seen, { getppid: N, labs: N, strtol: N, splice: N, ldexp: N });
  assert.equal(libc.labs(-3n), 3n);
});

/** How many return addresses the probe keeps. */
const PROBE_CAPACITY = 4000;

/**
 * A native getpid that keeps its return address: `buffer` holds the count of calls, then the
 * first `PROBE_CAPACITY` return addresses. It makes the system call itself.
 */
function returnAddressProbe(buffer: bigint): number[] {
  if (isArm64) {
    return [
      ...words(
        0x58000190, // ldr x16, buffer (+48)
        0xf9400211, // ldr x17, [x16]: the count
        0xf13e823f, // cmp x17, #4000
        0x54000062, // b.hs skip (+12)
        0x8b110e09, // add x9, x16, x17, lsl #3
        0xf900053e, // str x30, [x9, #8]: the return address
        0x91000631, // skip: add x17, x17, #1
        0xf9000211, // str x17, [x16]
        0xd2801588, // mov x8, #172 (getpid)
        0xd4000001, // svc #0
        0xd65f03c0, // ret
        0xd503201f, // nop (the literal is 8-byte aligned)
      ),
      ...u64(buffer),
    ];
  }
  return [
    0x49, 0xbb, ...u64(buffer), //   movabs r11, buffer
    0xb8, 0x01, 0, 0, 0, //          mov eax, 1
    0xf0, 0x49, 0x0f, 0xc1, 0x03, // lock xadd [r11], rax: the count
    0x48, 0x3d, ...u64(BigInt(PROBE_CAPACITY)).slice(0, 4), // cmp rax, 4000
    0x73, 0x09, //                   jae skip
    0x4c, 0x8b, 0x14, 0x24, //       mov r10, [rsp]: the return address
    0x4d, 0x89, 0x54, 0xc3, 0x08, // mov [r11+rax*8+8], r10
    0xb8, 39, 0, 0, 0, //            skip: mov eax, 39 (getpid)
    0x0f, 0x05, //                   syscall
    0xc3, //                         ret
  ];
}

function u64(value: bigint): number[] {
  return Array.from({ length: 8 }, (_, i) => Number((value / 256n ** BigInt(i)) % 256n));
}

/** The return addresses the probe kept since the last call, and forgets them. */
function probed(buffer: bigint): bigint[] {
  const view = new DataView(runtime.view(buffer, 8 * (PROBE_CAPACITY + 1)).slice().buffer);
  const count = Math.min(Number(view.getBigUint64(0, true)), PROBE_CAPACITY);
  runtime.view(buffer, 8).fill(0);
  return Array.from({ length: count }, (_, i) => view.getBigUint64(8 * (i + 1), true));
}

test("where getpid's callers are (native probe): the program's FFI calls pass the guard's rule, V8's during GC do not", () => {
  if (runtime.os !== "linux") return;
  {
    using _ = redefine({ symbol: "getppid", parameters: [], result: "i32" }, () => 1);
  }
  const code = machine().runtimeCode!;
  const passes = (at: bigint) => at < code.start || at >= code.end || (at >= code.ffiStart && at < code.ffiEnd);
  const pages = Math.ceil(8 * (PROBE_CAPACITY + 1) / os.pageSize);
  const buffer = mapPages(pages);
  const probe = assemble(returnAddressProbe(buffer));
  const own = runtime.open("libc.so.6", { getpid: { parameters: [], result: "i32" } });
  try {
    using _ = redefine({ symbol: "getpid", parameters: [], result: "i32" }, probe.address);
    probed(buffer);
    const CALLS = 3000; // the first through libffi, the rest through the runtime's JIT'd path
    for (let i = 0; i < CALLS; i++) own.getpid!();
    const program = probed(buffer);
    assert.equal(program.filter(passes).length, CALLS, "each of the program's calls, and nothing else, passes");
    let keep: { i: number }[] = [];
    for (let i = 0; i < 1_500_000; i++) {
      keep.push({ i });
      if (keep.length > 100_000) keep = [];
    }
    const vm = probed(buffer);
    assert.deepEqual(vm.filter(passes), [], "no call the VM made on its own passes");
    if (runtimeName !== "bun") {
      assert.ok(vm.length > 0, "V8 calls getpid while collecting garbage");
      assert.ok(vm.every((at) => at >= code.start && at < code.end), "from the runtime's executable");
    }
  } finally {
    unassemble(probe.base);
    libc.munmap(buffer, BigInt(pages * os.pageSize));
  }
});
