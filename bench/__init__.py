"""Benchmark harness: see bench/README.md."""
