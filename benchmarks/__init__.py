"""Throughput, scaling and memory benchmarks (not tests; see README.md)."""
