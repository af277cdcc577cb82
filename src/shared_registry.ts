/**
 * The registry's process-wide half: native memory that every isolate of the process (the main
 * thread, each Worker, each `deno test --parallel` file — each with its own copy of this module)
 * finds and shares. It holds the code-write lock and the record of every live patch, so that
 * stacking, overlap refusal, `OUT_OF_ORDER` and `PATCH_MODIFIED` see other isolates' patches.
 *
 * The first copy in a process maps it and publishes its address in an environment variable named
 * after the process id (`setenv` without overwrite: of two copies racing, one wins and the other
 * unmaps its own); a child process inherits the variable under its parent's id and ignores it.
 * Each isolate also owns an identity word: non-zero while it lives (its JS thread's pointer once
 * a guard or a probe asks for it), cleared by a thread-exit destructor when the isolate's thread
 * ends — the guard stubs compare against it, and the registry takes a lock or a patch whose
 * owner's word is 0 as left by a dead isolate.
 * Where the C library offers no such place (Windows, macOS, a libc without thread destructors), the
 * store is this isolate's own, as if it were alone in the process.
 */
import { RedefineError } from "./errors.ts";
import { ANYWHERE, type Arch } from "./arch/types.ts";
import type { CodePool } from "./code_memory.ts";
import type { NativeCall, Platform, SymbolName } from "../platform/mod.ts";
import { farPlace, lazyLibrary } from "../platform/mod.ts";
import type { Signature } from "./signature.ts";

/** One live patch as every isolate sees it. */
export interface StoredPatch {
  /** Its place in the store. */
  readonly slot: number;
  /** Order of registration across the process: oldest first. */
  readonly seq: bigint;
  readonly address: bigint;
  readonly at: bigint;
  readonly destination: bigint;
  /** The identity word of the isolate that made it. */
  readonly owner: bigint;
  /** Made inert (every call goes to the original) while another isolate's patch is layered on it. */
  readonly retired: boolean;
  readonly written: Uint8Array;
  readonly original: Uint8Array;
}

/** The store, as one isolate uses it. */
export interface Store {
  /** This isolate's identity word (see the module doc). */
  readonly identity: bigint;
  /**
   * The identity word, holding this isolate's JS thread's pointer: read on first ask, as only the
   * guards and probes compare it with the running thread (a first patch without one never runs the
   * read, which costs a code slot and a call through a pointer — under Node a stub library).
   * Throws UNSUPPORTED_PLATFORM, the word left as it was, when the read gives 0 or 1 (see there).
   */
  ownIdentity(): bigint;
  /** Takes the process-wide lock (spinning, yielding the CPU); taken from a dead owner if need be. */
  lock(): void;
  unlock(): void;
  /** Changes whenever any isolate adds, removes or retires a record. */
  generation(): bigint;
  /** Every record. */
  records(): StoredPatch[];
  /** Stores a new record (under the lock), newest in the process; its slot. */
  add(patch: Omit<StoredPatch, "slot" | "seq" | "retired" | "owner">): number;
  remove(slot: number): void;
  retire(slot: number): void;
  /** False once the isolate owning `identity` has ended. */
  alive(identity: bigint): boolean;
}

/** Bumped whenever the layout below changes: copies of another layout keep apart. */
const LAYOUT = 1;
const SIZE = 1 << 20;
/**
 * `used`: slots ever taken (records live below it); `firstFree`: no slot below it is free, so an
 * add looks from there — a thousand patches in one transaction would otherwise scan a thousand
 * records each. It lives in what was spare header, so the layout stays the same: an older copy,
 * which ignores it, fills free slots wherever they are and frees without lowering it, so adds here
 * at worst skip the slots that copy freed.
 */
const HEADER = { lock: 0, generation: 8, nextSeq: 16, used: 24, firstFree: 28, size: 64 };
const RECORD = {
  seq: 0, address: 8, at: 16, destination: 24, owner: 32, retired: 40, writtenLength: 41,
  originalLength: 42, written: 48, original: 64, size: 80,
};
/** Bytes kept of a patch's written and original bytes: entry jumps and import slots are shorter. */
const BYTES = 16;
const CAPACITY = Math.floor((SIZE - HEADER.size) / RECORD.size);
const PROT_READ_WRITE = 3;
/** `cas(word, expected, desired) → previous`. */
const CAS: Signature = { parameters: ["usize", "u64", "u64"], result: "u64" };
/** Sections locked through the runtime's slow pointer call before the fast binding (see `openStore`). */
const RAW_LOCKS = 4;
/** Private: threads share it anyway, and a forked child must not. */
const MAP_PRIVATE_ANONYMOUS = 0x02 | 0x20;
const MAP_FIXED_NOREPLACE = 0x100000;
const MAP_FAILED = 2n ** 64n - 1n;
/** The identity word of a live isolate whose JS thread's pointer nothing has asked for yet. */
const UNREAD = 1n;

/** The C library functions the shared store needs, or null where one is missing. */
function libc(platform: Platform): Record<string, NativeCall> | null {
  const { runtime } = platform;
  if (runtime.os !== "linux") return null;
  // Bound a group at a time: what opening the store calls, and what only a lost race or a contended
  // lock does. Each is called a few times at most: where binding costs more than a call through a
  // pointer (Deno), none is bound (platform/lazy_library.ts).
  const symbols = {
    opening: {
      getenv: { parameters: ["buffer"], result: "usize" },
      setenv: { parameters: ["buffer", "buffer", "i32"], result: "i32" },
      getpid: { parameters: [], result: "i32" },
      mmap: { parameters: ["usize", "usize", "i32", "i32", "i32", "i64"], result: "usize" },
      __cxa_thread_atexit_impl: { parameters: ["usize", "usize", "usize"], result: "i32" },
    },
    seldom: {
      munmap: { parameters: ["usize", "usize"], result: "i32" },
      sched_yield: { parameters: [], result: "i32" },
    },
  } as const;
  const names = Object.values(symbols).flatMap((group) => Object.keys(group)) as SymbolName<typeof symbols>[];
  const c = lazyLibrary(runtime, "libc.so.6", symbols, {
    names,
    address: (symbol) => platform.os.symbolAddress(symbol, "libc.so.6"),
  });
  try {
    // Bound (or found) now, so that a C library lacking one of them is known here.
    for (const name of Object.keys(symbols.opening)) void c[name as keyof typeof c];
    return c;
  } catch (error) {
    if (error instanceof RedefineError) return null;
    throw error;
  }
}

function cString(text: string): Uint8Array {
  return new TextEncoder().encode(text + "\0");
}

/**
 * This isolate's view of the store: the process's (found or made), or its own. `threadPointer`
 * reads the JS thread's identity as the guard reads it; `bind` makes a JS callable of code at an address
 * on the runtime's fast call path (the lock is taken twice a patch), which may cost a stub library
 * to make: where the runtime's own call through a pointer is slow, this isolate's first RAW_LOCKS
 * sections use that one and `bind` is asked after them, so the first patch never pays for it.
 */
export function openStore(
  platform: Platform,
  pool: CodePool,
  arch: Arch,
  threadPointer: () => bigint,
  bind: (address: bigint, signature: Signature) => NativeCall,
): Store {
  const { runtime } = platform;
  const lockCode = arch.registryLock(runtime.os);
  const slot = pool.allocate(0n, ANYWHERE, lockCode.code.length, 16);
  if (!slot) throw new RedefineError("ALLOCATION_FAILED", "no executable memory for the registry's lock.");
  pool.write(slot, lockCode.code);
  const identity = slot.data;
  const word = (address: bigint) => {
    const live = runtime.view(address, 8);
    return new BigInt64Array(live.buffer, live.byteOffset, 1);
  };
  // Alive from the start; no thread pointer is 1 (they are aligned), so no guard takes it for one.
  Atomics.store(word(identity), 0, UNREAD);
  let owned = false;
  const c = libc(platform);
  let base: bigint | null = null;
  // The destructor is filed under libc (the DSO of the address given), which is never unloaded;
  // filed under "the main program" (NULL), Node's process crashed.
  const libcAddress = c ? platform.os.symbolAddress("__cxa_thread_atexit_impl") : 0n;
  if (c && c.__cxa_thread_atexit_impl!(slot.address + BigInt(lockCode.clear), identity, libcAddress) === 0) {
    base = shared(c, platform);
  }
  const bytes = base === null ? new Uint8Array(SIZE) : runtime.view(base, SIZE);
  const view = new DataView(bytes.buffer, bytes.byteOffset, SIZE);
  let cas: NativeCall | null = base === null ? null : runtime.fnPointer(slot.address, CAS);
  let rawLocks = runtime.slowPointerCalls ? RAW_LOCKS : Infinity;
  const u64 = (at: number) => view.getBigUint64(at, true);
  // setBigUint64 takes the value modulo 2^64 itself: no intermediate bigint a store.
  const setU64 = (at: number, value: bigint) => view.setBigUint64(at, value, true);
  const alive = (id: bigint) => id === identity || Atomics.load(word(id), 0) !== 0n;
  const bump = () => setU64(HEADER.generation, u64(HEADER.generation) + 1n);
  const recordAt = (slot: number) => HEADER.size + slot * RECORD.size;
  return {
    identity,
    ownIdentity() {
      if (owned) return identity;
      const pointer = BigInt.asIntN(64, threadPointer());
      // 0 would tell every isolate this one has ended (its lock and patches are then taken), 1 that
      // it lives on a thread no guard matches (every call to the original, the replacement unused).
      if (pointer === 0n || pointer === UNREAD) {
        throw new RedefineError(
          "UNSUPPORTED_PLATFORM",
          `the JS thread's pointer read as ${pointer}, not a thread's: on this platform a guard or probe cannot tell the JS thread from others; use a native replacement.`,
        );
      }
      Atomics.store(word(identity), 0, pointer);
      owned = true;
      return identity;
    },
    lock() {
      if (!cas) return;
      if (rawLocks-- === 0) cas = bind(slot.address, CAS);
      for (let tries = 0;; tries++) {
        const holder = BigInt(cas(base!, 0n, identity));
        if (holder === 0n) return;
        // An isolate that ended while holding the lock never gives it back.
        if (!alive(holder) && BigInt(cas(base!, holder, identity)) === holder) return;
        if (tries > 64) c!.sched_yield!();
      }
    },
    unlock() {
      if (cas) cas(base!, identity, 0n);
    },
    generation: () => u64(HEADER.generation),
    records() {
      const found: StoredPatch[] = [];
      const used = view.getUint32(HEADER.used, true);
      for (let slot = 0; slot < used; slot++) {
        const at = recordAt(slot);
        const seq = u64(at + RECORD.seq);
        if (seq === 0n) continue;
        found.push({
          slot,
          seq,
          address: u64(at + RECORD.address),
          at: u64(at + RECORD.at),
          destination: u64(at + RECORD.destination),
          owner: u64(at + RECORD.owner),
          retired: view.getUint8(at + RECORD.retired) !== 0,
          written: bytes.slice(at + RECORD.written, at + RECORD.written + view.getUint8(at + RECORD.writtenLength)),
          original: bytes.slice(at + RECORD.original, at + RECORD.original + view.getUint8(at + RECORD.originalLength)),
        });
      }
      return found.sort((a, b) => (a.seq < b.seq ? -1 : 1));
    },
    add(patch) {
      if (patch.written.length > BYTES || patch.original.length > BYTES) {
        throw new RangeError(`internal: the registry keeps ${BYTES} bytes of a patch, not ${patch.written.length}`);
      }
      const used = view.getUint32(HEADER.used, true);
      let slot = view.getUint32(HEADER.firstFree, true);
      while (slot < used && u64(recordAt(slot) + RECORD.seq) !== 0n) slot++;
      if (slot === CAPACITY) {
        throw new RedefineError("ALLOCATION_FAILED", `more than ${CAPACITY} live patches: restore some first.`);
      }
      if (slot === used) view.setUint32(HEADER.used, used + 1, true);
      view.setUint32(HEADER.firstFree, slot + 1, true);
      const at = recordAt(slot);
      const seq = u64(HEADER.nextSeq) + 1n;
      setU64(HEADER.nextSeq, seq);
      setU64(at + RECORD.address, patch.address);
      setU64(at + RECORD.at, patch.at);
      setU64(at + RECORD.destination, patch.destination);
      setU64(at + RECORD.owner, identity);
      view.setUint8(at + RECORD.retired, 0);
      view.setUint8(at + RECORD.writtenLength, patch.written.length);
      view.setUint8(at + RECORD.originalLength, patch.original.length);
      bytes.set(patch.written, at + RECORD.written);
      bytes.set(patch.original, at + RECORD.original);
      setU64(at + RECORD.seq, seq);
      bump();
      return slot;
    },
    remove(slot) {
      setU64(recordAt(slot) + RECORD.seq, 0n);
      if (slot < view.getUint32(HEADER.firstFree, true)) view.setUint32(HEADER.firstFree, slot, true);
      bump();
    },
    retire(slot) {
      view.setUint8(recordAt(slot) + RECORD.retired, 1);
      bump();
    },
    alive,
  };
}

/** The process's store: found through the environment, or made and published there. */
function shared(c: Record<string, NativeCall>, platform: Platform): bigint {
  const { os, runtime } = platform;
  const name = cString(`REDEFINE_REGISTRY_${LAYOUT}_${c.getpid!()}`);
  const published = (): bigint | null => {
    const value = BigInt(c.getenv!(name));
    return value === 0n ? null : BigInt(runtime.cString(value));
  };
  const found = published();
  if (found !== null) return found;
  // Far from the libraries: the system's own choice would take near space stubs need. The place
  // `farPlace` gives when nothing is mapped low is free in most processes, so it is tried before
  // the map is read (a first patch then reads it not at all: a read and parse of it costs a few
  // hundred µs there).
  const size = BigInt(SIZE), page = BigInt(os.pageSize);
  const lowest = farPlace([], size, page);
  let mine = BigInt(c.mmap!(lowest, size, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0n));
  if (mine !== lowest) {
    // Taken, or a kernel before 4.17, which takes MAP_FIXED_NOREPLACE as a mere hint.
    if (mine !== MAP_FAILED) c.munmap!(mine, size);
    mine = BigInt(c.mmap!(farPlace(os.mappings(), size, page), size, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS, -1, 0n));
  }
  if (mine === MAP_FAILED) throw new RedefineError("ALLOCATION_FAILED", "mmap of the process-wide registry failed.");
  c.setenv!(name, cString(`0x${mine.toString(16)}`), 0);
  const winner = published()!;
  if (winner !== mine) c.munmap!(mine, BigInt(SIZE));
  return winner;
}
