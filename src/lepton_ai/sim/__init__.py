"""Deterministic simulator: runs the real sans-I/O cores over a seeded faulty network."""
