/**
 * A small Windows DLL written in memory that imports given functions through its import address
 * table (one import descriptor per DLL, names by hint/name entries, bound by the loader) and
 * exports, for each, `call_<name>`: a tail jump through that import's slot. Loaded with the
 * system's loader, it stands for any DLL whose import table `callers` rewrites, with imports named
 * as on any Windows (real Windows DLLs import through API sets, Wine's from kernel32).
 */
import {
  align,
  exportSection,
  IMAGE_SCN_CODE_EXECUTE_READ,
  IMAGE_SCN_DATA_READ_WRITE,
  SECTION_ALIGNMENT,
  writeDll,
} from "../platform/image/pe.ts";

/** Data directory indices. */
const IMPORT = 1, IAT = 12;
const encoder = new TextEncoder();

/** One function a DLL made by `importingDll` imports. */
export interface DllImport {
  /** The DLL it is imported from, as the import descriptor names it ("kernel32.dll"). */
  readonly library: string;
  readonly name: string;
}

/**
 * A PE32+ DLL (x86-64) named `dllName` that imports each of `imports` through its import address
 * table and exports, for each, `call_<name>`: a tail jump through that slot (`jmp [rip+slot]`),
 * so that calling it is calling the import the way any DLL does — what `callers` redirects.
 * The slots lie in a read+write `.idata` section, one table per imported DLL, in the order given.
 */
export function importingDll(dllName: string, imports: readonly DllImport[]): Uint8Array {
  const libraries = [...new Set(imports.map((i) => i.library))];
  const grouped = libraries.map((library) => imports.filter((i) => i.library === library));
  const codeRva = 0x1000, idataRva = 0x2000;
  // .idata: the descriptors (one per DLL and a null one), then per DLL its lookup table and its
  // import address table (the same entries, each ended by a zero), then hint/name entries, then names.
  const descriptorsSize = 20 * (libraries.length + 1);
  let at = align(descriptorsSize, 8); // the slots must be 8-byte aligned: callers rewrites each with one store
  const tables = grouped.map((group) => {
    const lookup = at, iat = lookup + 8 * (group.length + 1);
    at = iat + 8 * (group.length + 1);
    return { lookup, iat };
  });
  const iatStart = tables[0]?.iat ?? at, iatEnd = at;
  const strings: { at: number; bytes: Uint8Array }[] = [];
  const string = (bytes: Uint8Array) => {
    at = align(at, 2); // hint/name entries are 2-byte aligned
    strings.push({ at, bytes });
    at += bytes.length;
    return strings[strings.length - 1].at;
  };
  const hintNames = grouped.map((group) => group.map((i) => string(Uint8Array.of(0, 0, ...encoder.encode(i.name + "\0")))));
  const dllNames = libraries.map((library) => string(encoder.encode(library + "\0")));
  const idata = new Uint8Array(at);
  const d = new DataView(idata.buffer);
  grouped.forEach((group, g) => {
    const { lookup, iat } = tables[g];
    d.setUint32(20 * g, idataRva + lookup, true); // OriginalFirstThunk
    d.setUint32(20 * g + 12, idataRva + dllNames[g], true); // Name
    d.setUint32(20 * g + 16, idataRva + iat, true); // FirstThunk
    group.forEach((_, i) => {
      d.setBigUint64(lookup + 8 * i, BigInt(idataRva + hintNames[g][i]), true);
      d.setBigUint64(iat + 8 * i, BigInt(idataRva + hintNames[g][i]), true);
    });
  });
  for (const s of strings) idata.set(s.bytes, s.at);

  // .text: 8 bytes per import, its slot in the order the imports were given.
  const slots = imports.map((imp) => {
    const g = libraries.indexOf(imp.library);
    return idataRva + tables[g].iat + 8 * grouped[g].indexOf(imp);
  });
  const text = new Uint8Array(8 * imports.length);
  const t = new DataView(text.buffer);
  slots.forEach((slot, i) => {
    const here = codeRva + 8 * i;
    text.set([0xff, 0x25], 8 * i); // jmp qword [rip+disp32]
    t.setInt32(8 * i + 2, slot - (here + 6), true);
    text.set([0xcc, 0xcc], 8 * i + 6); // int3 ×2: padding
  });
  const edataRva = align(idataRva + idata.length, SECTION_ALIGNMENT);
  const edata = exportSection(edataRva, dllName, imports.map((imp, i) => ({ name: `call_${imp.name}`, rva: codeRva + 8 * i })), codeRva);
  return writeDll([
    { name: ".text", rva: codeRva, bytes: text, virtualSize: text.length, flags: IMAGE_SCN_CODE_EXECUTE_READ },
    { name: ".idata", rva: idataRva, bytes: idata, virtualSize: idata.length, flags: IMAGE_SCN_DATA_READ_WRITE },
    edata.section,
  ], [...edata.directories, [IMPORT, idataRva, descriptorsSize], [IAT, idataRva + iatStart, iatEnd - iatStart]]);
}
