/**
 * The native mocks on Windows x64, for real (run under Wine by `npm run test:windows`; registers
 * nothing on other systems). `fakeClock`: kernel32's `GetSystemTimeAsFileTime` and
 * `GetSystemTimePreciseAsFileTime` report the fake time for the whole process, or — with `callers`
 * — only through msvcrt's import address table (its `time`), while the program's own calls keep the
 * real clock; a native thread reads the fake time too; every entry and slot comes back exactly.
 * `returns` and `sequence` (the Windows x64 code) on kernel32 functions, counted, on any thread.
 */
import { assert, assertCode, test } from "./harness.ts";
import { fakeClock, imports, redefine, returns, sequence } from "../mod.ts";
import { platform } from "../platform/mod.ts";
import { onWindows, win32 } from "./windows_native.ts";

if (onWindows) {
  const { runtime, os } = platform();
  const msvcrt = runtime.open("msvcrt.dll", { time: { parameters: ["pointer"], result: "i64" } });
  const kernel32 = runtime.open("kernel32.dll", {
    GetSystemTimeAsFileTime: { parameters: ["buffer"], result: "void" },
    GetSystemTimePreciseAsFileTime: { parameters: ["buffer"], result: "void" },
    GetCurrentProcessId: { parameters: [], result: "u32" },
    GetTickCount: { parameters: [], result: "u32" },
    Sleep: { parameters: ["u32"], result: "void" },
  });
  const { procAddress, onAnotherThread } = win32();

  /** FILETIME counts 100 ns from 1601; Unix seconds count from 1970. */
  const EPOCH_1601 = 116_444_736_000_000_000n;
  const AT = Date.UTC(2001, 8, 9, 1, 46, 40); // 1000000000 s
  const DAY = 86_400_000;
  const real = (seconds: bigint) => seconds > 1_700_000_000n;
  const fileTimeSeconds = (read: (ft: Uint8Array) => unknown) => {
    const ft = new BigUint64Array(1);
    read(new Uint8Array(ft.buffer));
    return (ft[0] - EPOCH_1601) / 10_000_000n;
  };
  const coarse = () => fileTimeSeconds((ft) => kernel32.GetSystemTimeAsFileTime(ft));
  const precise = () => fileTimeSeconds((ft) => kernel32.GetSystemTimePreciseAsFileTime(ft));
  /** msvcrt's `time(NULL)` on a new thread (time_t fits the 32-bit exit code until 2106). */
  const timeOnAnotherThread = () => BigInt(onAnotherThread(procAddress("msvcrt.dll", "time")));
  const CLOCKS = ["GetSystemTimeAsFileTime", "GetSystemTimePreciseAsFileTime"];
  /** The first 16 bytes of each clock function and msvcrt's import slots of them. */
  const snapshot = () => {
    const entries = CLOCKS.map((name) => runtime.view(os.symbolAddress(name, "kernel32.dll"), 16).slice());
    const slots = imports("msvcrt.dll").filter((i) => CLOCKS.includes(i.name)).map((i) => runtime.view(i.slot, 8).slice());
    return { entries, slots };
  };

  test("windows fakeClock: the whole process, frozen — kernel32's clocks, msvcrt's time, another thread; then exact bytes", () => {
    const before = snapshot();
    {
      using clock = fakeClock({ at: AT });
      assert.equal(coarse(), 1_000_000_000n, "GetSystemTimeAsFileTime");
      assert.equal(precise(), 1_000_000_000n, "GetSystemTimePreciseAsFileTime");
      assert.equal(msvcrt.time(0n), 1_000_000_000n, "msvcrt's time reads it through kernel32");
      assert.equal(timeOnAnotherThread(), 1_000_000_000n, "a native thread sees the fake time");
      kernel32.Sleep(20);
      assert.equal(coarse(), 1_000_000_000n, "frozen");
      clock.advance(DAY);
      assert.equal(precise(), 1_000_086_400n);
      assert.equal(msvcrt.time(0n), 1_000_086_400n);
      assert.equal(clock.now(), AT + DAY);
      console.log(`Date.now() under a process-wide fake clock on ${runtime.name}: ${new Date(Date.now()).toISOString()}`);
    }
    console.log(`Date.now() right after restore on ${runtime.name}: ${new Date(Date.now()).toISOString()}`);
    assert.deepEqual(snapshot(), before, "every entry comes back exactly");
    assert.ok(real(coarse()) && real(precise()) && real(msvcrt.time(0n) as bigint));
  });

  test("windows fakeClock: running (rate 1) from the time given", () => {
    using clock = fakeClock({ at: AT, rate: 1 });
    const first = precise();
    assert.ok(first >= 1_000_000_000n && first < 1_000_000_010n, `${first}`);
    kernel32.Sleep(1100);
    const later = precise();
    assert.ok(later > first && later < first + 10n, `${first} then ${later}`);
    assert.ok(clock.now() >= AT + 1000);
  });

  test("windows fakeClock({ callers: 'msvcrt.dll' }): msvcrt's time only, through its import slot; the program keeps the real clock", () => {
    const before = snapshot();
    {
      using clock = fakeClock({ at: AT, callers: "msvcrt.dll" });
      assert.equal(msvcrt.time(0n), 1_000_000_000n);
      assert.ok(real(coarse()) && real(precise()), "the program's own calls of kernel32 are untouched");
      clock.advance(DAY);
      assert.equal(msvcrt.time(0n), 1_000_086_400n);
      assert.equal(timeOnAnotherThread(), 1_000_086_400n, "msvcrt on another thread too (native code)");
      assert.deepEqual(snapshot().entries, before.entries, "no entry is written");
    }
    assert.deepEqual(snapshot(), before, "the slots come back exactly");
    assert.ok(real(msvcrt.time(0n) as bigint));
    assertCode(() => fakeClock({ callers: "ntdll.dll" }), "NOT_IMPORTED");
  });

  test("windows returns(): GetCurrentProcessId gives 42 to the program and to a native thread, both counted; restored exactly", () => {
    const address = os.symbolAddress("GetCurrentProcessId", "kernel32.dll");
    const bytes = runtime.view(address, 16).slice();
    const pid = kernel32.GetCurrentProcessId() as number;
    {
      using patch = redefine({ symbol: "GetCurrentProcessId", library: "kernel32.dll", parameters: [], result: "u32" }, returns(42));
      assert.equal(kernel32.GetCurrentProcessId(), 42);
      assert.equal(onAnotherThread(procAddress("kernel32.dll", "GetCurrentProcessId")), 42);
      assert.equal(patch.calls, 2);
    }
    assert.deepEqual(runtime.view(address, 16).slice(), bytes);
    assert.equal(kernel32.GetCurrentProcessId(), pid);
  });

  test("windows sequence(): GetTickCount steps through the values, the last repeating, across threads", () => {
    const address = os.symbolAddress("GetTickCount", "kernel32.dll");
    const bytes = runtime.view(address, 16).slice();
    {
      using patch = redefine({ symbol: "GetTickCount", library: "kernel32.dll", parameters: [], result: "u32" }, sequence(10, 20, 30));
      assert.equal(kernel32.GetTickCount(), 10);
      assert.equal(onAnotherThread(procAddress("kernel32.dll", "GetTickCount")), 20);
      assert.deepEqual([kernel32.GetTickCount(), kernel32.GetTickCount()], [30, 30]);
      assert.equal(patch.calls, 4);
    }
    assert.deepEqual(runtime.view(address, 16).slice(), bytes);
  });
}
