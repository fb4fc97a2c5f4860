"""Latency and accuracy benchmarks (`spine-edge bench`)."""
