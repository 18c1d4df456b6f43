"""Latency benchmarks: workloads, interleaved measurement in worker processes, reports."""
