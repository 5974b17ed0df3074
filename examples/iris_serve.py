"""Serve the iris random forest with replicas behind a load balancer.

    lepton serve examples/iris_serve.py:predict --replicas 3 --port 8080
    curl -d '{"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}' \\
        http://127.0.0.1:8080/predict
    # -> {"predictions": ["setosa", "virginica"]}

Each replica calls ``setup()`` once: it loads ``iris_forest.joblib`` next to this
file if present, else trains the forest (150 rows, well under a second). The
fitted estimator itself can be served too:

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

MODEL_FILE = Path(__file__).with_name("iris_forest.joblib")
_state: dict[str, Any] = {}


def train() -> Any:
    """The iris random forest (fixed seed, so every replica serves the same model)."""
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier

    iris = load_iris()
    forest = RandomForestClassifier(n_estimators=50, random_state=0)
    forest.fit(iris.data, iris.target)
    forest.class_names_ = list(iris.target_names)
    return forest


def setup() -> None:
    """Called once per replica before it reports ready: load or train the model."""
    if MODEL_FILE.exists():
        import joblib

        _state["model"] = joblib.load(MODEL_FILE)
    else:
        _state["model"] = train()


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

        joblib.dump(train(), args.save)
        print("saved", args.save)
        return
    _demo()


if __name__ == "__main__":
    main()
