"""The coordinator's state machine on a local log, and the apply helpers it shares
with the replicated one (``node.replicated.CoordinatorMachine``).

Applying is deterministic and the same on every replica: a job command updates
the job state and, through ``coord_storage.link_job_command``, the stored objects
it owns; the hooks then tell this replica's controllers what changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

from lepton_ai.compute.job_state import (
    ApplyResult,
    JobCommand,
    JobFinished,
    JobStateConfig,
    JobStateMachine,
    decode_command,
    encode_apply_result,
)
from lepton_ai.node.coord_storage import closes_jobs, link_job_command
from lepton_ai.serve.spec import (
    DeploymentsMachine,
    decode_deploy_command,
    encode_deploy_result,
)
from lepton_ai.storage.messages import ObjectMeta
from lepton_ai.storage.meta import (
    StorageStateMachine,
    decode_storage_command,
    encode_storage_result,
)


class HostedMachine(Protocol):
    """What the coordinator needs of its state machine (``JobsMachine`` or the
    replicated ``node.replicated.CoordinatorMachine``)."""

    jobs: JobStateMachine
    storage: StorageStateMachine
    deployments: DeploymentsMachine
    listener: Callable[[JobCommand, ApplyResult], None] | None
    storage_listener: Callable[[list[ObjectMeta]], None] | None

    def apply(self, command: bytes) -> bytes: ...


class _LocalSnapshot(msgspec.Struct, array_like=True):
    jobs: bytes
    storage: bytes
    deployments: bytes = b""


class JobsMachine:
    """The coordinator's ``StateMachine`` on a local log: jobs and stored objects'
    metadata, plus apply hooks.

    The hooks are how applied commands reach the scheduler and the storage
    control; they are attached only after recovery, so replaying the log at start
    does not re-drive anything.
    """

    def __init__(self, config: JobStateConfig | None = None) -> None:
        self.jobs = JobStateMachine(config)
        self.storage = StorageStateMachine()
        self.deployments = DeploymentsMachine()
        self.listener: Callable[[JobCommand, ApplyResult], None] | None = None
        self.storage_listener: Callable[[list[ObjectMeta]], None] | None = None

    def apply(self, command: bytes) -> bytes:
        # As ``JobStateMachine.apply``, decoding once for the machine and the hook.
        try:
            cmd = decode_command(command)
        except ValueError as exc:
            return apply_storage_bytes(self, command, exc)
        return apply_job_command(self, cmd)

    def snapshot(self) -> bytes:
        return msgspec.msgpack.encode(
            _LocalSnapshot(
                self.jobs.snapshot(), self.storage.snapshot(), self.deployments.snapshot()
            )
        )

    def restore(self, data: bytes) -> None:
        snap = msgspec.msgpack.decode(data, type=_LocalSnapshot)
        self.jobs.restore(snap.jobs)
        self.storage.restore(snap.storage)
        if snap.deployments:
            self.deployments.restore(snap.deployments)


def apply_job_command(machine: HostedMachine, cmd: JobCommand) -> bytes:
    """Apply a job command and its storage effects (a stored result becomes an
    object; a closed or forgotten job's objects go); run the hooks."""
    before = set(machine.jobs.state.jobs) if closes_jobs(cmd) else None
    rec = machine.jobs.job(cmd.job_id) if isinstance(cmd, JobFinished) else None
    result = machine.jobs.apply_command(cmd)
    plan = rec.plan if rec is not None else None
    removed = link_job_command(machine.storage, machine.jobs, cmd, result, before, plan=plan)
    if machine.listener is not None:
        machine.listener(cmd, result)
    if removed and machine.storage_listener is not None:
        machine.storage_listener(removed)
    return encode_apply_result(result)


def apply_deploy_bytes(machine: HostedMachine, command: bytes) -> bytes | None:
    """Apply a deployment command; None if ``command`` is not one."""
    try:
        cmd = decode_deploy_command(command)
    except ValueError:
        return None
    return encode_deploy_result(machine.deployments.apply_command(cmd))


def apply_storage_bytes(machine: HostedMachine, command: bytes, job_error: Exception) -> bytes:
    """Apply a storage or deployment command (``job_error``: why the bytes are no job
    command)."""
    deployed = apply_deploy_bytes(machine, command)
    if deployed is not None:
        return deployed
    try:
        scmd = decode_storage_command(command)
    except ValueError:
        return encode_apply_result(ApplyResult(False, str(job_error)))
    res = machine.storage.apply_command(scmd)
    if res.removed and machine.storage_listener is not None:
        machine.storage_listener(res.removed)
    return encode_storage_result(res)
