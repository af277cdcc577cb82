/**
 * The live counter line of a long trace: on a terminal, once the script has run for a second,
 * stderr shows the calls counted so far, rewritten in place a few times a second and erased
 * before the report. Its timer never keeps the process alive.
 */
import process from "node:process";
import { clearInterval, setInterval } from "node:timers";

/** Shows `line()` on stderr while the trace runs, when stderr is a terminal; returns the stop. */
export function liveLine(line: () => string, afterMs = 1000, everyMs = 250): () => void {
  if (!process.stderr.isTTY) return () => {};
  const started = performance.now();
  let shown = false;
  const timer = setInterval(() => {
    if (performance.now() - started < afterMs) return;
    process.stderr.write(`\r\x1b[K${line()}`);
    shown = true;
  }, everyMs);
  timer.unref();
  return () => {
    clearInterval(timer);
    if (shown) process.stderr.write("\r\x1b[K");
  };
}
