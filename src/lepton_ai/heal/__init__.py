"""Self-healing layer: reconcilers that drive observed state to desired state.

They restart, reschedule and re-replicate.
"""
