"""Where ``lepton cluster up`` writes its cluster's address, token and pids, and reading it.

Shared by the CLI and ``lep.connect()`` (which finds a cluster started that way).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_ENV = "LEPTON_STATE_FILE"


def default_state_file() -> Path:
    return Path(os.environ.get(STATE_ENV) or Path.home() / ".lepton" / "cluster.json")


def read_state(path_text: str | None) -> dict[str, Any]:
    """The state file's contents; ValueError when no cluster was started there."""
    path = Path(path_text) if path_text else default_state_file()
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"no running cluster: {path} does not exist "
            "(start one with `lepton cluster up` or pass --address)"
        ) from None
    return state
