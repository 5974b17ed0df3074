"""Self-healing layer: reconcilers that drive observed state towards desired state (restart, reschedule, re-replicate)."""
