"""Serve the iris random forest with replicas behind a load balancer.

    lepton serve examples/iris_serve.py:predict --replicas 3 --port 8080
    curl -d '{"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}' \\
        http://127.0.0.1:8080/predict
    # -> {"predictions": ["setosa", "virginica"]}

Each replica calls ``setup()`` once: it trains the random forest of the iris
example (examples/iris_forest.py: 200 trees in 8 shares, merged; here trained
serially, which that example shows gives the same forest) or loads it from a
cache file in the temp directory. The fitted estimator itself can be served too:

    python examples/iris_serve.py --save /tmp/iris.joblib
    lepton serve /tmp/iris.joblib --replicas 3      # predict() of the estimator

Run without arguments for a demo: 3 replicas, a bounded load, one replica
SIGKILLed mid-load, and the client's view of it.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

CACHE_NAME = "iris-forest-200x8-seed0.joblib"


def cache_path() -> Path:
    """The trained forest's cache in this user's own cache directory (0700): a shared
    place such as /tmp would let another local user plant a pickle the replicas load."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lepton"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root / CACHE_NAME


_state: dict[str, Any] = {}


def train() -> Any:
    """The forest of examples/iris_forest.py: same split, shares and merge, trained serially.

    iris_forest.py checks that its distributed forest equals exactly this serial one.
    """
    from iris_forest import make_trainer, merge_forests, shares_of  # the iris example
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split

    x, y = load_iris(return_X_y=True)
    x_train, _, y_train, _ = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    fit = make_trainer(x_train, y_train)
    shares = shares_of(200, 8, 0)
    forest = fit(shares[0])
    for share in shares[1:]:
        forest = merge_forests(forest, fit(share))
    forest.class_names_ = [str(name) for name in load_iris().target_names]
    return forest


def setup() -> None:
    """Called once per replica before it reports ready: load the cached forest or train it."""
    import joblib

    cache = cache_path()
    if cache.exists():
        _state["model"] = joblib.load(cache)
        return
    _state["model"] = train()
    # Cached so a restarted replica is ready sooner; written whole, then renamed (atomic).
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    joblib.dump(_state["model"], partial)
    os.replace(partial, cache)


def predict(instances: list[list[float]]) -> list[str]:
    """Species names for rows of [sepal length, sepal width, petal length, petal width]."""
    model = _state["model"]
    return [model.class_names_[int(i)] for i in model.predict(instances)]


predict.n_features_in_ = 4  # type: ignore[attr-defined]  # lets the replica 400 a wrong shape


def _demo() -> None:
    import lepton_ai as lep
    from lepton_ai.serve.loadgen import run_load_sync

    body = b'{"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}'
    with lep.Deployment(f"{__file__}:predict", replicas=3) as dep:
        print("serving at", dep.url)
        results: list[Any] = []
        load = threading.Thread(
            target=lambda: results.append(
                run_load_sync(
                    f"{dep.url}/predict",
                    body,
                    concurrency=8,
                    requests_max=100_000,
                    duration_s_max=5.0,
                )
            )
        )
        load.start()
        time.sleep(1.5)
        victim = dep.status()[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        print(f"SIGKILLed replica pid {victim}")
        killed = time.monotonic()
        while time.monotonic() - killed < 60:
            rows = dep.status()
            if sum(r["ready"] for r in rows) == 3 and victim not in [r["pid"] for r in rows]:
                break
            time.sleep(0.05)
        print(f"3 replicas ready again {time.monotonic() - killed:.2f} s after the kill")
        load.join()
        r = results[0]
        print(f"{r.ok} requests ok, {r.failed} failed, p50 {r.percentile_ms(50):.2f} ms")
        for row in dep.status():
            print(
                f"  replica {row['id']}: pid {row['pid']} ready={row['ready']} "
                f"restarts={row['restarts']}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save", metavar="PATH", help="train and save the forest (joblib)")
    args = parser.parse_args()
    if args.save:
        import joblib

        joblib.dump(train(), args.save)  # a plain fitted estimator: lepton serve calls predict
        print("saved", args.save)
        return
    _demo()


if __name__ == "__main__":
    main()
