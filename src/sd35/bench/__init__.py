"""Benchmarks: one module per `sd35 bench …` command (results belong in docs/benchmarks.md), and `sd35
fidelity` (FP8 vs bf16, per block)."""
