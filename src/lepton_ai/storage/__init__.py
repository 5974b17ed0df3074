"""Storage layer: node-local block store, checksummed shuffle files, replicated blobs.

``blockstore``: the block store every worker node keeps for shuffle output.
"""
