/**
 * The part of the Win32 API the Windows layer calls: kernel32 and ntdll bound with the runtime's
 * FFI, their constants, and the string forms the `A` and `W` functions take.
 */
import type { Runtime } from "./types.ts";

export const PAGE_NOACCESS = 0x01;
export const PAGE_READONLY = 0x02;
export const PAGE_READWRITE = 0x04;
export const PAGE_WRITECOPY = 0x08;
export const PAGE_EXECUTE = 0x10;
export const PAGE_EXECUTE_READ = 0x20;
export const PAGE_EXECUTE_READWRITE = 0x40;
export const PAGE_EXECUTE_WRITECOPY = 0x80;
export const PAGE_GUARD = 0x100;
export const MEM_COMMIT = 0x1000;
export const MEM_FREE = 0x10000;
export const MEM_IMAGE = 0x1000000;
export const FILE_MAP_WRITE = 0x2;
export const FILE_MAP_READ = 0x4;
export const FILE_MAP_EXECUTE = 0x20;
export const GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT = 0x2;
export const GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS = 0x4;
export const INVALID_HANDLE_VALUE = 2n ** 64n - 1n;
export const GENERIC_WRITE = 0x40000000;
export const FILE_SHARE_READ = 1;
export const CREATE_NEW = 1;
export const FILE_ATTRIBUTE_NORMAL = 0x80;
/** `GetCurrentProcess()`'s pseudo handle. */
export const CURRENT_PROCESS = -1n;
/** MEMORY_BASIC_INFORMATION on x64. */
export const MBI_SIZE = 48;
export const MBI_BYTES = BigInt(MBI_SIZE);
/** How many thunks in a row are followed before giving up (a cycle, or a chain of forwarders). */
export const MAX_THUNKS = 4;

export const ERROR_NAMES: Record<number, string> = {
  2: "ERROR_FILE_NOT_FOUND",
  5: "ERROR_ACCESS_DENIED",
  6: "ERROR_INVALID_HANDLE",
  8: "ERROR_NOT_ENOUGH_MEMORY",
  87: "ERROR_INVALID_PARAMETER",
  126: "ERROR_MOD_NOT_FOUND",
  127: "ERROR_PROC_NOT_FOUND",
  193: "ERROR_BAD_EXE_FORMAT",
  487: "ERROR_INVALID_ADDRESS",
  998: "ERROR_NOACCESS",
};

export function kernel32(runtime: Runtime) {
  return runtime.open("kernel32.dll", {
    GetLastError: { parameters: [], result: "u32" },
    GetSystemInfo: { parameters: ["buffer"], result: "void" },
    // A pseudo handle, -1: as i64, since Bun would hand an unsigned 2^64-1 over as a lossy number.
    GetCurrentProcess: { parameters: [], result: "i64" },
    GetCurrentProcessId: { parameters: [], result: "u32" },
    GetModuleHandleW: { parameters: ["buffer"], result: "usize" },
    GetModuleHandleExW: { parameters: ["u32", "usize", "buffer"], result: "i32" },
    LoadLibraryW: { parameters: ["buffer"], result: "usize" },
    GetProcAddress: { parameters: ["usize", "buffer"], result: "usize" },
    GetModuleFileNameW: { parameters: ["usize", "buffer", "u32"], result: "u32" },
    K32EnumProcessModules: { parameters: ["i64", "buffer", "u32", "buffer"], result: "i32" },
    VirtualProtect: { parameters: ["usize", "usize", "u32", "buffer"], result: "i32" },
    VirtualQuery: { parameters: ["usize", "buffer", "usize"], result: "usize" },
    FlushInstructionCache: { parameters: ["i64", "usize", "usize"], result: "i32" },
    CreateFileMappingW: { parameters: ["usize", "usize", "u32", "u32", "u32", "usize"], result: "usize" },
    MapViewOfFileEx: { parameters: ["usize", "u32", "u32", "u32", "usize", "usize"], result: "usize" },
    UnmapViewOfFile: { parameters: ["usize"], result: "i32" },
    CloseHandle: { parameters: ["usize"], result: "i32" },
    GetTempPathW: { parameters: ["u32", "buffer"], result: "u32" },
    CreateFileW: { parameters: ["buffer", "u32", "u32", "usize", "u32", "u32", "usize"], result: "usize" },
    WriteFile: { parameters: ["usize", "buffer", "u32", "buffer", "usize"], result: "i32" },
  });
}

export function ntdll(runtime: Runtime) {
  return runtime.open("ntdll.dll", {
    RtlLookupFunctionEntry: { parameters: ["u64", "buffer", "usize"], result: "usize" },
  });
}


/** The bound kernel32 functions. */
export type Kernel32 = ReturnType<typeof kernel32>;
/** The bound ntdll functions. */
export type Ntdll = ReturnType<typeof ntdll>;

/** A NUL-terminated UTF-16 string, as the `W` functions take it. */
export function wideString(text: string): Uint8Array {
  const units = new Uint16Array(text.length + 1);
  for (let i = 0; i < text.length; i++) units[i] = text.charCodeAt(i);
  return new Uint8Array(units.buffer);
}

export function ansiString(text: string): Uint8Array {
  return new TextEncoder().encode(text + "\0");
}


/** `GetLastError()` as its name and number, for messages. */
export function lastErrorText(k: Kernel32): string {
  const code = k.GetLastError() as number;
  return `${ERROR_NAMES[code] ?? "error"} (${code})`;
}
