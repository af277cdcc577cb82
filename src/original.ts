/**
 * Calling the original from JS at full speed. Each patch's original gets a stub in a small shared
 * library generated in memory (platform/image/elf.ts): the stub jumps through a slot that points at
 * the patch's trampoline. Bound with the runtime's own `dlopen`, the stub takes the runtime's fast
 * call path — Deno has none for raw pointers (`UnsafeFnPointer` costs hundreds of ns a call).
 */
import type { Arch } from "./arch/types.ts";
import { buildStubImage } from "../platform/mod.ts";
import type { NativeCall, Platform, StubImage } from "../platform/mod.ts";
import type { Signature } from "./signature.ts";
import { RedefineError } from "./errors.ts";

const STUBS_PER_LIBRARY = 64;

interface StubLibrary {
  readonly path: string;
  readonly image: StubImage;
  readonly base: bigint;
  /** Where its image ends in memory. */
  readonly end: bigint;
  readonly free: number[];
}

/** A stub of the shared library, bound to one signature. */
export interface OriginalStub {
  /** Calls whatever the slot points at, with the signature's JS types. */
  readonly call: NativeCall;
  /** Points the slot at `address` (one atomic store: callers see the old or the new target). */
  point(address: bigint): void;
}

/** Hands out stubs; a stub goes back to the pool once nothing holds it any more. */
export class OriginalStubs {
  readonly #platform: Platform;
  readonly #arch: Arch;
  readonly #libraries: StubLibrary[] = [];
  readonly #byKey = new Map<string, WeakRef<OriginalStub>>();
  readonly #collected = new FinalizationRegistry<{ library: StubLibrary; index: number }>(
    ({ library, index }) => library.free.push(index),
  );

  constructor(platform: Platform, arch: Arch) {
    this.#platform = platform;
    this.#arch = arch;
  }

  /**
   * A stub for `signature` pointing at `address`. The same function redefined again with the same
   * signature gets the same stub (re-pointed), so a JS call site that calls it stays monomorphic
   * and keeps the runtime's fast path.
   */
  acquire(key: string, signature: Signature, address: bigint): OriginalStub {
    const known = this.#byKey.get(key);
    const stub = known?.deref();
    if (stub) {
      stub.point(address);
      return stub;
    }
    const fresh = this.#create(signature, address);
    this.#byKey.set(key, new WeakRef(fresh));
    return fresh;
  }

  /** Whether `address` is inside one of the stub libraries (their code is no function to redefine). */
  contains(address: bigint): boolean {
    // Indexed, with no closure: asked of every target.
    for (let i = 0; i < this.#libraries.length; i++) {
      if (address >= this.#libraries[i]!.base && address < this.#libraries[i]!.end) return true;
    }
    return false;
  }

  #create(signature: Signature, address: bigint): OriginalStub {
    let library: StubLibrary;
    try {
      library = this.#libraries.find((l) => l.free.length > 0) ?? this.#load();
    } catch (error) {
      if (!(error instanceof RedefineError && error.code === "UNSUPPORTED_PLATFORM")) throw error;
      return this.#slowStub(signature, address);
    }
    const index = library.free.pop()!;
    const { runtime } = this.#platform;
    const slot = library.base + BigInt(library.image.slotOffset(index));
    const point = (to: bigint) => {
      const view = runtime.view(slot, 8);
      Atomics.store(new BigInt64Array(view.buffer, view.byteOffset, 1), 0, BigInt.asIntN(64, to));
    };
    point(address);
    const name = library.image.name(index);
    const call = runtime.open(library.path, { [name]: signature })[name]!;
    const stub = { call, point };
    // Free once the JS function is garbage: whoever holds it may still call through the slot.
    this.#collected.register(call, { library, index });
    return stub;
  }

  /**
   * Where no stub library can be loaded (macOS: it would need a signed Mach-O), a call through
   * the runtime's raw function pointer: correct, and as slow as that is on the runtime.
   */
  #slowStub(signature: Signature, address: bigint): OriginalStub {
    const { runtime } = this.#platform;
    let target = runtime.fnPointer(address, signature);
    return {
      call: (...args: unknown[]) => target(...args),
      point: (to) => (target = runtime.fnPointer(to, signature)),
    };
  }

  #load(): StubLibrary {
    const { os } = this.#platform;
    const arch = this.#arch;
    const image = buildStubImage({
      machine: arch.name,
      count: STUBS_PER_LIBRARY,
      prefix: `redefine_original_${this.#libraries.length}_`,
      stubSize: arch.indirectJumpSize,
      jump: (stub, slot) => arch.indirectJump(BigInt(stub), BigInt(slot)),
    });
    const path = os.loadableImage(image.bytes);
    const base = os.symbolAddress(image.name(0), path) - BigInt(image.stubOffset(0));
    const library = {
      path,
      image,
      base,
      end: base + BigInt(image.bytes.length),
      free: Array.from({ length: STUBS_PER_LIBRARY }, (_, i) => STUBS_PER_LIBRARY - 1 - i),
    };
    this.#libraries.push(library);
    return library;
  }
}
