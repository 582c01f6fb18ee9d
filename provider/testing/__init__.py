"""Helpers for tests and benchmarks: random-weight models that load through mlx-lm."""
