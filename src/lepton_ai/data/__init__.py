"""Data layer: datasets as partitioned collections, readers (items, numpy arrays,
text, CSV, JSONL and Parquet via fsspec) and partitioning."""
