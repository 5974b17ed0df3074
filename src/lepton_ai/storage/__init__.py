"""Storage layer: the data plane beside the Paxos log (DESIGN.md section 3).

``objects``: a node's durable object files (chunked, a crc32c per chunk), with
capacity accounting. ``messages``: object references and the chunked data-plane
protocol. ``dataserver`` / ``dataclient``: serving and moving objects between
nodes and clients, failing over mid-stream, short-circuited on one host.
``meta``: the replicated metadata (key -> object id, size, checksum, replica
nodes), a pure state machine in the coordinators' log. ``control``: the
client <-> leader requests (place, commit, stat, list, delete, fsck). ``client``:
``cluster.storage``. ``fsspec``: ``lep://`` URLs. ``cli``: ``lepton storage``.
``blockstore``: the shuffle files each node keeps for reducers.
"""
