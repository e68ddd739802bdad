"""What the tests, the soak and the benchmarks share: servers (in-process and subprocess), the engine's test hooks,
ports, certificates, a fake engine and a load generator."""
