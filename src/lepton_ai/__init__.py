"""lepton_ai: a fault-tolerant platform for AI workloads.

MapReduce-style jobs over worker processes, a Paxos-replicated control plane,
replicated model serving and self-healing, with no external services.

The public names are imported lazily so that ``import lepton_ai`` stays cheap
(executor start-up imports it) and each layer loads only when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it (DESIGN.md section 5).
_EXPORTS: dict[str, str] = {
    "LocalCluster": "lepton_ai.node.local_cluster",
    "connect": "lepton_ai.node.cluster_handle",
    "Cluster": "lepton_ai.node.cluster_handle",
    "DistributedTask": "lepton_ai.compute.api",
    "Dataset": "lepton_ai.compute.api",
    "Job": "lepton_ai.compute.job",
    "TaskError": "lepton_ai.errors",
    "JobFailed": "lepton_ai.errors",
    "JobCancelled": "lepton_ai.errors",
    "Unavailable": "lepton_ai.errors",
    "LeptonError": "lepton_ai.errors",
    "StorageFull": "lepton_ai.errors",
    "DataLost": "lepton_ai.errors",
    "LimitExceeded": "lepton_ai.errors",
    "Deployment": "lepton_ai.serve.deployment",
    "ServeClient": "lepton_ai.serve.client",
    "DeploymentFailed": "lepton_ai.serve.cluster_deployment",
    "cost": "lepton_ai.monitor.cost",  # a module: lep.cost.job_time(...)
}

__all__ = [
    "Cluster",
    "DataLost",
    "Dataset",
    "Deployment",
    "DeploymentFailed",
    "DistributedTask",
    "Job",
    "JobCancelled",
    "JobFailed",
    "LeptonError",
    "LimitExceeded",
    "LocalCluster",
    "ServeClient",
    "StorageFull",
    "TaskError",
    "Unavailable",
    "connect",
    "cost",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lepton_ai.errors import DataLost as DataLost
    from lepton_ai.errors import JobCancelled as JobCancelled
    from lepton_ai.errors import JobFailed as JobFailed
    from lepton_ai.errors import LeptonError as LeptonError
    from lepton_ai.errors import LimitExceeded as LimitExceeded
    from lepton_ai.errors import StorageFull as StorageFull
    from lepton_ai.errors import TaskError as TaskError
    from lepton_ai.errors import Unavailable as Unavailable
    from lepton_ai.monitor import cost as cost


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lepton_ai' has no attribute {name!r}")
    imported = importlib.import_module(module)
    # "cost" names a module itself (lep.cost.job_time), the others a name in one.
    value = imported if module.endswith(f".{name}") else getattr(imported, name)
    globals()[name] = value
    return value
