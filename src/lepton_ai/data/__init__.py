"""Data layer: datasets as partitioned collections, readers (items, numpy arrays,
text via fsspec) and partitioning."""
