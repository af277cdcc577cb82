// The baseline of the start-up benchmark on Node (bench/startup.bench.ts): a script that does nothing.
