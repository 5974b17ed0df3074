"""Every Prometheus target of a cluster, from its status and its deployments: one
list for the coordinators' ``/sd`` (HTTP service discovery) and for
``cluster.metrics_urls``, so the two can never disagree."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from lepton_ai.node.messages import MemberInfo
from lepton_ai.serve.spec import DeploymentInfo


def sd_groups(members: list[MemberInfo], deployments: list[DeploymentInfo]) -> list[dict[str, Any]]:
    """Prometheus HTTP SD target groups (``{"targets": ["host:port"], "labels": ...}``):
    coordinators and worker agents (an executor's metrics are its agent's, so agents
    stand for them), each node's serving balancer, and each running model replica."""
    groups: list[dict[str, Any]] = []
    for m in members:
        if m.role not in ("coordinator", "worker"):
            continue
        labels = {"lepton_role": m.role, "lepton_id": m.id}
        if m.node:
            labels["lepton_node"] = m.node
        if m.metrics:
            groups.append({"targets": [m.metrics], "labels": labels})
        if m.serve:
            groups.append(
                {
                    "targets": [urlsplit(m.serve).netloc],
                    "labels": {**labels, "lepton_role": "balancer"},
                }
            )
    for dep in deployments:
        for r in dep.replicas:
            if r.url and r.state == "ready":
                labels = {
                    "lepton_role": "replica",
                    "lepton_id": r.replica_id,
                    "lepton_deployment": dep.spec.name,
                    "lepton_node": r.node,
                }
                groups.append({"targets": [urlsplit(r.url).netloc], "labels": labels})
    return groups


def metrics_urls(groups: list[dict[str, Any]]) -> list[str]:
    return sorted({f"http://{t}/metrics" for g in groups for t in g["targets"]})
