"""Benchmark harness: size, latency, memory, energy and quality of dense vs candidates, interleaved."""
