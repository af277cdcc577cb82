/**
 * The fake-clock recipe: freeze SQLite's idea of "now" for a test, while the rest of the process —
 * the runtime's own `Date.now()` included — keeps the real time. `callers` scopes the fake clock to
 * the calls libsqlite3 makes through its import table; the clock functions run native code that
 * reads the fake time from memory, so SQLite may ask from any thread.
 *
 *   deno run --allow-ffi examples/fake_clock_sqlite.ts
 *   bun examples/fake_clock_sqlite.ts
 */
import { fakeClock } from "../mod.ts";
import { cstr, open, readCString } from "./ffi.ts";

const sqlite = open("libsqlite3.so.0", {
  sqlite3_open: { parameters: ["buffer", "buffer"], result: "i32" },
  sqlite3_prepare_v2: { parameters: ["u64", "buffer", "i32", "buffer", "u64"], result: "i32" },
  sqlite3_step: { parameters: ["u64"], result: "i32" },
  sqlite3_column_text: { parameters: ["u64", "i32"], result: "u64" },
  sqlite3_finalize: { parameters: ["u64"], result: "i32" },
  sqlite3_close: { parameters: ["u64"], result: "i32" },
});

const handle = new BigUint64Array(1);
sqlite.sqlite3_open(cstr(":memory:"), new Uint8Array(handle.buffer));
const db = handle[0];

/** SQLite's answer to one query of one row and one column, as text. */
function ask(sql: string): string {
  const statement = new BigUint64Array(1);
  sqlite.sqlite3_prepare_v2(db, cstr(sql), -1, new Uint8Array(statement.buffer), 0n);
  sqlite.sqlite3_step(statement[0]);
  const text = readCString(sqlite.sqlite3_column_text(statement[0], 0));
  sqlite.sqlite3_finalize(statement[0]);
  return text;
}

const now = () => `datetime('now') = ${ask("SELECT datetime('now')")}, strftime('%s','now') = ${ask("SELECT strftime('%s','now')")}`;
const date = () => new Date().toISOString().slice(0, 19).replace("T", " ");

console.log(`real:      sqlite ${now()}; Date.now() ${date()}`);
{
  using clock = fakeClock({ at: Date.UTC(2001, 8, 9, 1, 46, 40), callers: "libsqlite3.so.0" });
  console.log(`frozen:    sqlite ${now()}; Date.now() ${date()}`);
  clock.advance(86_400_000);
  console.log(`+1 day:    sqlite ${now()}; Date.now() ${date()}`);
}
console.log(`restored:  sqlite ${now()}`);
sqlite.sqlite3_close(db);
