"""Every Prometheus target of a cluster, from its status and its deployments: one
list for the coordinators' ``/sd`` (HTTP service discovery) and for
``cluster.metrics_urls``, so the two can never disagree."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from lepton_ai.node.messages import MemberInfo
from lepton_ai.serve.spec import DeploymentInfo


def sd_groups(
    members: list[MemberInfo], deployments: list[DeploymentInfo], scheme: str = "http"
) -> list[dict[str, Any]]:
    """Prometheus HTTP SD target groups (``{"targets": ["host:port"], "labels": ...}``):
    coordinators and worker agents (an executor's metrics are its agent's, so agents
    stand for them), each node's serving balancer, and each running model replica.
    ``scheme``: the monitor ports' ("https" with TLS); each group's ``__scheme__``
    label tells Prometheus which to use (a replica on loopback stays plain HTTP)."""
    groups: list[dict[str, Any]] = []
    for m in members:
        if m.role not in ("coordinator", "worker"):
            continue
        labels = {"lepton_role": m.role, "lepton_id": m.id, "__scheme__": scheme}
        if m.node:
            labels["lepton_node"] = m.node
        if m.metrics:
            groups.append({"targets": [m.metrics], "labels": labels})
        if m.serve:
            url = urlsplit(m.serve)
            balancer = {**labels, "lepton_role": "balancer", "__scheme__": url.scheme}
            groups.append({"targets": [url.netloc], "labels": balancer})
    for dep in deployments:
        for r in dep.replicas:
            if r.url and r.state == "ready":
                url = urlsplit(r.url)
                labels = {
                    "lepton_role": "replica",
                    "lepton_id": r.replica_id,
                    "lepton_deployment": dep.spec.name,
                    "lepton_node": r.node,
                    "__scheme__": url.scheme,
                }
                groups.append({"targets": [url.netloc], "labels": labels})
    return groups


def metrics_urls(groups: list[dict[str, Any]]) -> list[str]:
    return sorted(
        {f"{g['labels']['__scheme__']}://{t}/metrics" for g in groups for t in g["targets"]}
    )
