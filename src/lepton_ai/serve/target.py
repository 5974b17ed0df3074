"""What a deployment serves: ``module:callable``, ``path/file.py:callable`` or a model file.

* ``pkg.module:name`` or ``path/to/file.py:name`` names a callable that takes the
  list of instances and returns a list of predictions (or an object with
  ``predict``, such as a fitted scikit-learn estimator). If that module also
  defines ``setup()``, each replica calls it once before it reports ready (to
  load the model into a module global, say); the name is looked up after it.
* ``model.pkl`` / ``model.joblib`` / ``model.pickle``: a pickled estimator whose
  ``predict`` is called.
* Either kind of file may be an object of the cluster's store:
  ``lep://models/iris.joblib`` or ``lep://code/model.py:predict``. Each replica
  copies it to a private temporary directory (``storage.fsspec``, the cluster from
  ``$LEPTON_ADDRESS``, which a worker agent sets) before loading, so every replica
  loads the same artifact wherever it runs.

``check_target`` validates the spec cheaply in the parent (before any port is
bound); ``load_target`` runs in each replica.
"""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

MODEL_SUFFIXES = (".pkl", ".pickle", ".joblib")
LEP = "lep://"


class TargetError(ValueError):
    """The TARGET cannot be loaded; the message says why."""


@dataclass(frozen=True)
class Target:
    """A loaded target: ``predict(instances) -> predictions`` plus what it came from."""

    spec: str
    predict: Callable[[list[Any]], Any]
    n_features: int | None  # from a scikit-learn model's n_features_in_, for 400s on bad shapes


def split_target(spec: str) -> tuple[str, str | None]:
    if not isinstance(spec, str) or not spec.strip():
        raise TargetError("TARGET must be 'module:callable', 'file.py:callable' or a model file")
    spec = spec.strip()
    if spec.endswith(MODEL_SUFFIXES):
        return spec, None
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name.isidentifier():
        raise TargetError(
            f"TARGET {spec!r}: expected 'module:callable', 'path/file.py:callable' or a "
            f"model file ending in {', '.join(MODEL_SUFFIXES)}"
        )
    return module, name


def _import(module: str) -> ModuleType:
    if module.endswith(".py"):
        path = Path(module).resolve()
        if not path.is_file():
            raise TargetError(f"TARGET file {module!r} does not exist")
        name = f"_lepton_target_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise TargetError(f"cannot import {module!r}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # pickle and dataclasses look the module up by name
        # The file's directory goes on the path so its sibling imports work (as `python file.py`).
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(mod)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise TargetError(f"importing {module!r} failed: {type(exc).__name__}: {exc}") from exc
        return mod
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise TargetError(f"importing {module!r} failed: {type(exc).__name__}: {exc}") from exc


def _check_model_file(path: Path) -> None:
    if not path.is_file():
        raise TargetError(f"model file {str(path)!r} does not exist")
    with path.open("rb") as fh:
        head = fh.read(2)
    # Both pickle (protocol >= 2) and joblib's uncompressed format start with PROTO (0x80);
    # compressed joblib files start with a zlib/gzip/etc. header, checked on load.
    if not head:
        raise TargetError(f"model file {str(path)!r} is empty")


def check_target(spec: str) -> None:
    """Fail fast (TargetError) if ``spec`` cannot be served; no setup() is run. A
    ``lep://`` target is only looked up (it is loaded where it runs)."""
    module, name = split_target(spec)
    if module.startswith(LEP):
        import fsspec

        from lepton_ai.storage import fsspec as lep_fs

        lep_fs.register()
        try:
            found = fsspec.filesystem("lep").exists(module)
        except Exception as exc:
            raise TargetError(f"cannot look up {module!r}: {type(exc).__name__}: {exc}") from exc
        if not found:
            raise TargetError(f"no object {module!r} in the cluster's store")
        return
    if name is None:
        _check_model_file(Path(module))
        return
    mod = _import(module)
    obj = getattr(mod, name, None)
    if obj is None:
        raise TargetError(f"{module!r} has no attribute {name!r}")
    if not callable(obj) and not callable(getattr(obj, "predict", None)):
        raise TargetError(f"{spec!r} is neither callable nor has a predict() method")


def _load_model_file(path: Path) -> Any:
    _check_model_file(path)
    try:
        if path.suffix == ".joblib":
            import joblib

            return joblib.load(path)
        with path.open("rb") as fh:
            return pickle.load(fh)
    except Exception as exc:
        raise TargetError(
            f"loading model {str(path)!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _as_predict(obj: Any, spec: str) -> Callable[[list[Any]], Any]:
    method = getattr(obj, "predict", None)
    if callable(method):
        return method  # type: ignore[no-any-return]
    if callable(obj):
        return obj  # type: ignore[no-any-return]
    raise TargetError(f"{spec!r} is neither callable nor has a predict() method")


def fetch_artifact(url: str) -> str:
    """Copy the object ``lep://KEY`` to a temporary file of this process (same base
    name, so ``.py``/``.joblib`` keep their meaning); its path. Removed at exit."""
    import atexit
    import shutil
    import tempfile

    import fsspec

    from lepton_ai.storage import fsspec as lep_fs

    lep_fs.register()
    folder = tempfile.mkdtemp(prefix="lepton-model-")
    atexit.register(shutil.rmtree, folder, True)
    local = Path(folder) / (url.rstrip("/").rsplit("/", 1)[-1] or "model")
    try:
        with fsspec.open(url, "rb") as src, local.open("wb") as dst:
            shutil.copyfileobj(src, dst, 4 << 20)
    except Exception as exc:
        raise TargetError(f"fetching {url!r} failed: {type(exc).__name__}: {exc}") from exc
    return str(local)


def load_target(spec: str) -> Target:
    """Import the target and run its module's ``setup()`` once (in a replica)."""
    module, name = split_target(spec)
    if module.startswith(LEP):
        module = fetch_artifact(module)
    if name is None:
        model = _load_model_file(Path(module))
        return Target(spec, _as_predict(model, spec), _n_features(model))
    mod = _import(module)
    obj = getattr(mod, name, None)
    if obj is None:
        raise TargetError(f"{module!r} has no attribute {name!r}")
    setup = getattr(mod, "setup", None)
    if callable(setup) and setup is not obj:
        try:
            setup()
        except Exception as exc:
            raise TargetError(f"setup() of {module!r} failed: {type(exc).__name__}: {exc}") from exc
        obj = getattr(mod, name)  # setup() may have rebound the name
    return Target(spec, _as_predict(obj, spec), _n_features(obj))


def _n_features(obj: Any) -> int | None:
    n = getattr(obj, "n_features_in_", None)
    return n if isinstance(n, int) and n > 0 else None
