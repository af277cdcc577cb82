// The baseline of the start-up benchmark (bench/startup.bench.ts): a script that does nothing.
