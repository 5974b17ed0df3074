"""The peers' own virtual environments (Dask, Ray, Ray Serve are no project dependencies)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def ensure_peer_venv(venv: Path, packages: list[str], probe: str, label: str) -> Path:
    """Create or repair ``venv`` with ``packages``; a no-op when ``probe`` (Python code,
    the imports the benchmark needs there) runs. Its python."""
    python = venv / "bin" / "python"
    if (
        python.exists()
        and subprocess.run([python, "-c", probe], check=False, capture_output=True).returncode == 0
    ):
        return python
    print(f"creating {venv} ({label}; once) ...", flush=True)
    if not python.exists():
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *packages], check=True)
    subprocess.run([python, "-c", probe], check=True)
    return python
