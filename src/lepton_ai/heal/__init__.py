"""Self-healing layer: reconcilers (pure cores run by the leader) that drive observed
state to desired state.

``replication``: copies objects short of replicas from a live copy and drops
excess ones. ``backoff``: the one back-off of every retry loop.
"""
