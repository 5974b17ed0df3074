"""Deployments as cluster state: the specs in the log and what travels about replicas.

A deployment on a cluster is a ``DeploymentSpec`` committed to the replicated log
(``DeploymentsMachine``, applied on every coordinator). The leader's reconciler
(``heal.deployments``) turns the specs and what the worker agents report into a
``ReplicaAssignment`` list per node (the agent runs exactly those replicas) and one
``Endpoint`` table (every ready replica, pushed to every node's balancer).

Pure: no asyncio, sockets, time or os (the purity test covers ``serve/spec.py``).
"""

from __future__ import annotations

import re

import msgspec

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # a DNS label, as Kubernetes
DEPLOYMENTS_MAX = 256  # specs in the log; a new name past it is refused
REPLICAS_MAX = 64  # per deployment
VERSIONS_KEPT = 10  # earlier specs kept per deployment, for rollback
TARGET_CHARS_MAX = 4_096


class Autoscale(msgspec.Struct, frozen=True):
    """Replicas follow the load: ``target_inflight`` requests in flight per replica,
    within ``[min_replicas, max_replicas]`` (``heal.autoscale``)."""

    min_replicas: int
    max_replicas: int
    target_inflight: float = 4.0
    scale_up_delay_s: float = 3.0  # the load must want more this long
    scale_down_delay_s: float = 30.0  # ... or fewer this long


class DeploymentSpec(msgspec.Struct, frozen=True):
    """What a deployment serves and how many copies. ``version`` grows by one on every
    change of what is served (target or replica settings); scaling keeps it."""

    name: str
    target: str  # "module:callable", "/abs/path/file.py:callable" or a model file
    replicas: int
    version: int = 1
    max_batch_size: int = 0
    max_wait_ms: float = 5.0
    autoscale: Autoscale | None = None  # None: ``replicas`` is fixed


class ReplicaAssignment(msgspec.Struct, frozen=True):
    """Leader -> agent: run this replica (the agent gets the full list for its node)."""

    replica_id: str  # unique in the cluster: "<deployment>.<version>.<n>"
    deployment: str
    version: int
    target: str
    max_batch_size: int = 0
    max_wait_ms: float = 5.0


class ReplicaReport(msgspec.Struct, frozen=True):
    """Agent -> leader: one replica it runs (or failed to)."""

    replica_id: str
    deployment: str
    version: int
    state: str  # "starting" | "ready" | "failed" | "stopping"
    url: str = ""  # http://host:port once the port is known
    pid: int = 0
    restarts: int = 0
    error: str = ""  # why it failed (a bad target, say)


class Endpoint(msgspec.Struct, frozen=True):
    """One ready replica, as every node's balancer routes to it."""

    deployment: str
    version: int
    replica_id: str
    url: str


class ReplicaInfo(msgspec.Struct, frozen=True):
    """One replica of a deployment, as ``dep.status()`` shows it."""

    replica_id: str
    node: str  # the worker node's name ("" while not placed)
    version: int
    state: str  # "pending" (placed, not reported yet) | "starting" | "ready" | "failed" | ...
    url: str = ""
    pid: int = 0
    restarts: int = 0
    error: str = ""


class DeploymentInfo(msgspec.Struct, frozen=True):
    spec: DeploymentSpec
    replicas: list[ReplicaInfo]
    urls: list[str]  # every node balancer's entry point for this deployment

    @property
    def ready(self) -> int:
        return sum(1 for r in self.replicas if r.state == "ready")


def assignment_for(spec: DeploymentSpec, replica_id: str) -> ReplicaAssignment:
    return ReplicaAssignment(
        replica_id, spec.name, spec.version, spec.target, spec.max_batch_size, spec.max_wait_ms
    )


# ------------------------------------------------------------------ log commands


class PutDeployment(msgspec.Struct, frozen=True, tag="PutDeployment"):
    """Create ``spec.name`` or change it. ``expect_version`` (0: any) guards an update
    against a concurrent one; the machine assigns the version itself."""

    spec: DeploymentSpec
    expect_version: int = 0
    create_only: bool = False  # refuse if the name exists (a create that must be new)


class ScaleDeployment(msgspec.Struct, frozen=True, tag="ScaleDeployment"):
    name: str
    replicas: int


class RollbackDeployment(msgspec.Struct, frozen=True, tag="RollbackDeployment"):
    """Serve the spec before the current one again (as a new version)."""

    name: str


class DeleteDeployment(msgspec.Struct, frozen=True, tag="DeleteDeployment"):
    name: str


DeploymentCommand = PutDeployment | ScaleDeployment | RollbackDeployment | DeleteDeployment


class DeployResult(msgspec.Struct, frozen=True, tag="DeployResult"):
    ok: bool
    error: str = ""
    spec: DeploymentSpec | None = None  # the spec now in force (None after a delete)
    kind: str = ""  # of an error: "invalid" | "not_found" | "exists" | "limit"


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(DeploymentCommand)
_result_decoder = msgspec.msgpack.Decoder(DeployResult)


def encode_deploy_command(cmd: DeploymentCommand) -> bytes:
    return _encoder.encode(cmd)


def decode_deploy_command(data: bytes) -> DeploymentCommand:
    """ValueError if ``data`` is no deployment command (another machine's command)."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc)) from None


def encode_deploy_result(res: DeployResult) -> bytes:
    return _encoder.encode(res)


def decode_deploy_result(data: bytes) -> DeployResult:
    return _result_decoder.decode(data)


def check_spec(spec: DeploymentSpec) -> None:
    """ValueError naming the field, for what no replica could ever serve."""
    if not isinstance(spec.name, str) or not NAME_RE.match(spec.name):
        raise ValueError(
            f"deployment name {spec.name!r}: lower-case letters, digits and '-', "
            "1-63 characters, starting and ending with a letter or digit"
        )
    if not isinstance(spec.replicas, int) or not 0 <= spec.replicas <= REPLICAS_MAX:
        raise ValueError(f"replicas must be in 0..{REPLICAS_MAX}, got {spec.replicas!r}")
    if not spec.target or len(spec.target) > TARGET_CHARS_MAX:
        raise ValueError(f"target must be 1..{TARGET_CHARS_MAX} characters")
    if spec.max_batch_size < 0 or spec.max_wait_ms < 0:
        raise ValueError("max_batch_size and max_wait_ms must be >= 0")
    if spec.autoscale is not None:
        check_autoscale(spec.autoscale)


def check_autoscale(a: Autoscale) -> None:
    if not 0 <= a.min_replicas <= a.max_replicas <= REPLICAS_MAX or a.max_replicas < 1:
        raise ValueError(
            f"autoscale needs 0 <= min_replicas <= max_replicas <= {REPLICAS_MAX} and "
            f"max_replicas >= 1, got {a.min_replicas}..{a.max_replicas}"
        )
    if not a.target_inflight > 0:
        raise ValueError(f"target_inflight must be > 0, got {a.target_inflight}")
    if not 0 <= a.scale_up_delay_s <= 3600 or not 0 <= a.scale_down_delay_s <= 3600:
        raise ValueError("scale_up_delay_s and scale_down_delay_s must be in 0..3600")


class _Snapshot(msgspec.Struct, array_like=True):
    history: dict[str, list[DeploymentSpec]]


class DeploymentsMachine:
    """The deployment specs every coordinator agrees on; deterministic ``apply``."""

    def __init__(self) -> None:
        # name -> its specs, oldest first; the last one is in force (VERSIONS_KEPT + 1 kept).
        self.history: dict[str, list[DeploymentSpec]] = {}

    @property
    def specs(self) -> dict[str, DeploymentSpec]:
        return {name: h[-1] for name, h in self.history.items()}

    def get(self, name: str) -> DeploymentSpec | None:
        h = self.history.get(name)
        return h[-1] if h else None

    def apply_command(self, cmd: DeploymentCommand) -> DeployResult:
        if isinstance(cmd, PutDeployment):
            return self._put(cmd)
        current = self.get(cmd.name)
        if current is None:
            return DeployResult(False, f"no deployment named {cmd.name!r}", kind="not_found")
        if isinstance(cmd, ScaleDeployment):
            if not 0 <= cmd.replicas <= REPLICAS_MAX:
                return DeployResult(False, f"replicas must be in 0..{REPLICAS_MAX}", kind="invalid")
            return self._push(msgspec.structs.replace(current, replicas=cmd.replicas))
        if isinstance(cmd, RollbackDeployment):
            return self._rollback(cmd.name, current)
        del self.history[cmd.name]
        return DeployResult(True)

    def _put(self, cmd: PutDeployment) -> DeployResult:
        try:
            check_spec(cmd.spec)
        except ValueError as exc:
            return DeployResult(False, str(exc), kind="invalid")
        current = self.get(cmd.spec.name)
        if current is None:
            if len(self.history) >= DEPLOYMENTS_MAX:
                return DeployResult(False, f"at most {DEPLOYMENTS_MAX} deployments", kind="limit")
            return self._push(msgspec.structs.replace(cmd.spec, version=1))
        if cmd.create_only:
            if _served(cmd.spec) == _served(current) and cmd.spec.replicas == current.replicas:
                return DeployResult(True, spec=current)  # a retried create: already done
            return DeployResult(False, f"deployment {cmd.spec.name!r} exists", current, "exists")
        if cmd.expect_version and cmd.expect_version != current.version:
            return DeployResult(
                False,
                f"deployment {current.name!r} is at version {current.version}, "
                f"not {cmd.expect_version}",
                current,
                "invalid",
            )
        if _served(cmd.spec) == _served(current):  # the count or policy only: same version
            return self._push(
                msgspec.structs.replace(
                    current, replicas=cmd.spec.replicas, autoscale=cmd.spec.autoscale
                )
            )
        return self._push(msgspec.structs.replace(cmd.spec, version=current.version + 1))

    def _rollback(self, name: str, current: DeploymentSpec) -> DeployResult:
        history = self.history[name]
        earlier = [s for s in history[:-1] if _served(s) != _served(current)]
        if not earlier:
            return DeployResult(
                False, f"deployment {name!r} has no earlier version", current, "invalid"
            )
        back = msgspec.structs.replace(
            earlier[-1],
            replicas=current.replicas,
            version=current.version + 1,
            autoscale=current.autoscale,
        )
        return self._push(back)

    def _push(self, spec: DeploymentSpec) -> DeployResult:
        history = self.history.setdefault(spec.name, [])
        if history and history[-1].version == spec.version:
            history[-1] = spec  # a scale: the same version, another count
        else:
            history.append(spec)
            del history[: -(VERSIONS_KEPT + 1)]
        return DeployResult(True, spec=spec)

    def snapshot(self) -> bytes:
        return _encoder.encode(_Snapshot(self.history))

    def restore(self, data: bytes) -> None:
        self.history = dict(msgspec.msgpack.decode(data, type=_Snapshot).history)


def _served(spec: DeploymentSpec) -> tuple[str, int, float]:
    """What a rollback compares: what is served, not how many or which version."""
    return spec.target, spec.max_batch_size, spec.max_wait_ms
