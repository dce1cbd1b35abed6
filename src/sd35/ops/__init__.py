"""Ops: running the shared box — `sd35 doctor`, the shared cache's admin (init, verify, ls), `sd35 lab`, the
workspace's pins and torch's CUDA line against the driver."""
