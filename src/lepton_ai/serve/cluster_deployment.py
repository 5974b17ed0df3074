"""A deployment that is cluster state: ``lep.Deployment(target, cluster=c, name="iris")``.

The spec is committed to the coordinators' replicated log and the call returns;
the leader's reconciler places replicas on the worker nodes and every node's
balancer routes to every ready one. Nothing runs in the caller's process: the
deployment outlives it, the leader and any one node. Any process finds it again
with ``lep.Deployment.get(cluster, "iris")``.

    dep = lep.Deployment("model.py:predict", replicas=3, cluster=cluster, name="iris")
    dep.wait_ready()
    dep.urls                      # every node's entry point: POST {url}/predict
    dep.scale(5); dep.update("model_v2.py:predict"); dep.rollback(); dep.delete()
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

from lepton_ai.errors import LeptonError, Unavailable
from lepton_ai.node.messages import ChangeDeployment, Deployments, GetDeployments
from lepton_ai.serve.spec import (
    Autoscale,
    DeleteDeployment,
    DeploymentCommand,
    DeploymentInfo,
    DeploymentSpec,
    PutDeployment,
    RollbackDeployment,
    ScaleDeployment,
    check_spec,
)
from lepton_ai.serve.target import LEP, TargetError, split_target

WAIT_POLL_S = 0.1
REQUEST_TIMEOUT_S = 30.0


class DeploymentFailed(LeptonError):
    """A replica of the wanted version cannot start (its error is in the message)."""


class _Cluster(Protocol):
    """What this needs of ``LocalCluster`` / ``lep.connect()``: their coordinator client."""

    client: Any
    storage: Any


def resolve_target(target: str, cluster: _Cluster | None = None) -> str:
    """A file target made absolute (the agents run elsewhere than the caller's
    directory); ``TargetError`` at once for what can never load. A ``lep://`` target
    must be an object of ``cluster``'s store."""
    if not isinstance(target, str):
        raise TypeError("target must be a str such as 'model.py:predict'")
    module, name = split_target(target)
    if module.startswith(LEP):
        if cluster is not None:
            try:
                cluster.storage.stat(module.removeprefix(LEP))
            except KeyError:
                raise TargetError(f"no object {module!r} in the cluster's store") from None
        return target.strip()
    if name is None or module.endswith(".py"):
        path = os.path.abspath(module)
        if not os.path.isfile(path):
            raise TargetError(f"TARGET file {module!r} does not exist")
        return path if name is None else f"{path}:{name}"
    return target.strip()


def _request(cluster: _Cluster, msg: object) -> DeploymentInfo | None:
    from lepton_ai.node.client import check_reply

    reply = check_reply(cluster.client.request(msg, REQUEST_TIMEOUT_S))
    if not isinstance(reply, Deployments):
        raise LeptonError(f"unexpected reply {type(reply).__name__}")
    return reply.deployments[0] if reply.deployments else None


class ClusterDeployment:
    """A handle on a deployment in the cluster's log (cheap: it holds only its name)."""

    def __init__(self, cluster: _Cluster, info: DeploymentInfo) -> None:
        self.cluster = cluster
        self.name = info.spec.name
        self._info = info

    # -- creation and lookup ----------------------------------------------------------
    @classmethod
    def create(
        cls,
        cluster: _Cluster,
        target: str,
        replicas: int,
        name: str,
        *,
        max_batch_size: int = 0,
        max_wait_ms: float = 5.0,
        autoscale: Autoscale | None = None,
    ) -> ClusterDeployment:
        """``autoscale``: the replica count follows the load within its bounds
        (``replicas`` is clamped to them to start with)."""
        if autoscale is not None:
            replicas = min(max(replicas, autoscale.min_replicas), autoscale.max_replicas)
        spec = DeploymentSpec(
            name,
            resolve_target(target, cluster),
            replicas,
            1,
            max_batch_size,
            max_wait_ms,
            autoscale,
        )
        check_spec(spec)  # a clear error at once, before any request
        info = cls._change(cluster, PutDeployment(spec, create_only=True))
        if info is None:
            raise LeptonError(f"deployment {name!r} was not created")
        return cls(cluster, info)

    @classmethod
    def get(cls, cluster: _Cluster, name: str) -> ClusterDeployment:
        """KeyError if the cluster has no deployment ``name``."""
        info = _request(cluster, GetDeployments(name))
        if info is None:
            raise KeyError(f"no deployment named {name!r}")
        return cls(cluster, info)

    @staticmethod
    def _change(cluster: _Cluster, cmd: DeploymentCommand) -> DeploymentInfo | None:
        return _request(cluster, ChangeDeployment(cmd))

    # -- state ----------------------------------------------------------------------
    def refresh(self) -> DeploymentInfo:
        info = _request(self.cluster, GetDeployments(self.name))
        if info is None:
            raise KeyError(f"deployment {self.name!r} was deleted")
        self._info = info
        return info

    @property
    def spec(self) -> DeploymentSpec:
        return self._info.spec

    @property
    def version(self) -> int:
        return self.refresh().spec.version

    @property
    def urls(self) -> list[str]:
        """Every worker node's balancer entry point for this deployment."""
        return list(self.refresh().urls)

    @property
    def url(self) -> str:
        urls = self.urls
        if not urls:
            raise Unavailable("no worker node serves (is any worker running with serve slots?)")
        return urls[0]

    def status(self) -> list[dict[str, Any]]:
        """Each replica: id, node, version, state, ready, url, pid, restarts, error."""
        return replica_dicts(self.refresh())

    def pids(self) -> list[int]:
        return [r["pid"] for r in self.status() if r["pid"]]

    # -- changes --------------------------------------------------------------------
    def scale(self, replicas: int, *, wait: bool = True, timeout_s: float = 120.0) -> None:
        if not isinstance(replicas, int) or isinstance(replicas, bool):
            raise TypeError("replicas must be an int")
        self._apply(ScaleDeployment(self.name, replicas), wait, timeout_s)

    def update(
        self,
        target: str,
        *,
        max_batch_size: int | None = None,
        max_wait_ms: float | None = None,
        wait: bool = True,
        timeout_s: float = 300.0,
    ) -> int:
        """Serve ``target`` instead, one replica at a time (a new one ready before an old
        one goes: no request fails); returns the new version."""
        old = self.refresh().spec
        spec = DeploymentSpec(
            self.name,
            resolve_target(target, self.cluster),
            old.replicas,
            old.version,
            old.max_batch_size if max_batch_size is None else max_batch_size,
            old.max_wait_ms if max_wait_ms is None else max_wait_ms,
            old.autoscale,
        )
        check_spec(spec)
        self._apply(PutDeployment(spec), wait, timeout_s)
        return self.spec.version

    def rollback(self, *, wait: bool = True, timeout_s: float = 300.0) -> int:
        """Serve the previous version's target again (as a new version); returns it."""
        self._apply(RollbackDeployment(self.name), wait, timeout_s)
        return self.spec.version

    def delete(self) -> None:
        """Remove the deployment; its replicas drain and stop on their nodes."""
        self._change(self.cluster, DeleteDeployment(self.name))

    def _apply(self, cmd: DeploymentCommand, wait: bool, timeout_s: float) -> None:
        info = self._change(self.cluster, cmd)
        if info is not None:
            self._info = info
        if wait:
            self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 120.0) -> ClusterDeployment:
        """Until the wanted count of the current version is ready and no other version
        serves. ``DeploymentFailed`` when a replica of it cannot start,
        ``TimeoutError`` past ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.refresh()
            version = info.spec.version
            mine = [r for r in info.replicas if r.version == version]
            ready = sum(1 for r in mine if r.state == "ready")
            others = [r for r in info.replicas if r.version != version]
            failed = [r for r in mine if r.state == "failed"]
            if failed and ready < info.spec.replicas:
                raise DeploymentFailed(
                    f"deployment {self.name!r} version {version}: replica "
                    f"{failed[0].replica_id} on {failed[0].node} failed: {failed[0].error}"
                )
            if ready == info.spec.replicas and not others and len(mine) == ready:
                return self
            if time.monotonic() >= deadline:
                states = ", ".join(f"{r.replica_id} {r.state}" for r in info.replicas)
                raise TimeoutError(
                    f"deployment {self.name!r}: {ready}/{info.spec.replicas} of version "
                    f"{version} ready after {timeout_s:g} s ({states or 'no replicas placed'})"
                )
            time.sleep(WAIT_POLL_S)


def replica_dicts(info: DeploymentInfo) -> list[dict[str, Any]]:
    """The replicas of ``info`` as ``status()`` lists them."""
    return [
        {
            "id": r.replica_id,
            "node": r.node,
            "version": r.version,
            "state": r.state,
            "ready": r.state == "ready",
            "url": r.url,
            "pid": r.pid,
            "restarts": r.restarts,
            "error": r.error,
        }
        for r in info.replicas
    ]


__all__ = ["ClusterDeployment", "DeploymentFailed", "replica_dicts", "resolve_target"]
