"""Compute layer: the DistributedTask and Dataset API, logical plan to stages,
the sans-I/O scheduler core and executor-side task execution."""
