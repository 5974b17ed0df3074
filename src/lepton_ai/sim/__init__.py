"""Deterministic simulator: runs the real sans-I/O cores over a seeded faulty network.

* ``cluster.SimCluster`` — N ``consensus.core.Replica`` in one process, one seed:
  simulated time and per-node clock drift, a ``network.SimNetwork`` (delay, loss,
  duplication, reordering, symmetric and asymmetric partitions, replayed stale
  messages), a disk whose fdatasync takes simulated time (``DiskConfig``; a leader's
  Accept/Heartbeat overtake it as in the real driver, ``ready_order.split_early``),
  crash/restart from what was "fsynced" (a crash may tear the Ready being written, also
  after its early messages went out), Raft-lab helpers (``wait_leader``, ``one``,
  ``settle``).
* ``checker.SafetyChecker`` — safety at every step (one value per slot and ballot, one
  chosen value per slot, in-order application, snapshots equal the chosen prefix,
  exactly-once commands, no stale read-index reads).
* ``fuzz`` — seeded random fault schedules; ``python -m lepton_ai.sim --seeds 0-9999``.
* ``linearizability`` — the KV history checker (owned by the runtime work).

Replay any failure with the printed ``LEPTON_SIM_SEED=<n> pytest <test>``.
"""
