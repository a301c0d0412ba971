"""Peers and helpers of bench/gpu_bench.py: one module per column family (see gpu_bench.py)."""
