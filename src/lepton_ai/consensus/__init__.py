"""Fault-tolerance layer: the Multi-Paxos replicated log, the replicated state machine and KV."""
