"""Storage layer: node-local block store, checksummed shuffle files, replicated blobs and output commit."""
