"""Distributed training of a scikit-learn random forest on Iris.

Each map task trains a share of the trees with its own seed; the reduce merges
the fitted trees into one forest (``estimators_`` concatenated, ``n_estimators``
updated). The merged forest is exactly what one process would get by training
the shares one after another and pooling them, so its accuracy is checked
against the held-out split and against that serial forest.

    .venv/bin/python examples/iris_forest.py [--workers 2] [--trees 200] [--shares 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import train_test_split

import lepton_ai as lep


def make_trainer(x_train: np.ndarray, y_train: np.ndarray) -> Any:
    """A map function that closes over the (small) training set: it travels with the plan."""

    def train_share(share: tuple[int, int]) -> RandomForestClassifier:
        seed, n_trees = share
        forest = RandomForestClassifier(n_estimators=n_trees, random_state=seed, n_jobs=1)
        return forest.fit(x_train, y_train)

    return train_share


def merge_forests(a: RandomForestClassifier, b: RandomForestClassifier) -> RandomForestClassifier:
    """The reduce: one forest holding both forests' trees (same classes, same features)."""
    if list(a.classes_) != list(b.classes_) or a.n_features_in_ != b.n_features_in_:
        raise ValueError("forests trained on different label sets or features cannot be merged")
    merged = RandomForestClassifier(**a.get_params())
    merged.estimators_ = [*a.estimators_, *b.estimators_]
    merged.n_estimators = len(merged.estimators_)
    for attr in ("classes_", "n_classes_", "n_features_in_", "n_outputs_", "estimator_"):
        if hasattr(a, attr):
            setattr(merged, attr, getattr(a, attr))
    return merged


def shares_of(trees: int, shares: int, seed: int) -> list[tuple[int, int]]:
    """Split ``trees`` over ``shares`` maps as evenly as possible, each with its own seed."""
    base, extra = divmod(trees, shares)
    return [(seed * 1000 + i, base + (i < extra)) for i in range(shares) if base + (i < extra)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--trees", type=int, default=200)
    ap.add_argument("--shares", type=int, default=8, help="map tasks (one share of trees each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.trees <= 0 or args.shares <= 0 or args.workers <= 0:
        ap.error("--trees, --shares and --workers must be > 0")

    x, y = load_iris(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=args.seed, stratify=y
    )
    shares = shares_of(args.trees, args.shares, args.seed)
    t0 = time.perf_counter()
    with lep.LocalCluster(workers=args.workers) as cluster:
        t_cluster = time.perf_counter() - t0
        task = lep.DistributedTask(cluster, progress=False)
        task.map(make_trainer(x_train, y_train), shares, partitions=len(shares))
        forest: RandomForestClassifier = task.reduce(merge_forests)
    t_total = time.perf_counter() - t0
    accuracy = float(forest.score(x_test, y_test))

    # The same shares trained here, pooled the same way: the distributed forest must match it.
    train = make_trainer(x_train, y_train)
    serial = train(shares[0])
    for share in shares[1:]:
        serial = merge_forests(serial, train(share))
    # Tree order may differ (reduce order), so probabilities agree up to float rounding.
    same = bool(np.allclose(forest.predict_proba(x_test), serial.predict_proba(x_test)))

    out = {
        "trees": forest.n_estimators,
        "trees_fitted": len(forest.estimators_),
        "map_tasks": len(shares),
        "workers": args.workers,
        "accuracy": accuracy,
        "test_samples": len(y_test),
        "matches_serial_forest": same,
        "cluster_start_s": round(t_cluster, 3),
        "total_s": round(t_total, 3),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"random forest: {out['trees']} trees from {len(shares)} map tasks on "
            f"{args.workers} workers in {t_total:.2f} s (cluster start {t_cluster:.2f} s)"
        )
        print(f"held-out accuracy: {accuracy:.3f} on {len(y_test)} samples")
        print(f"identical to the same trees trained serially: {same}")
    return 0 if same and out["trees_fitted"] == args.trees else 1


if __name__ == "__main__":
    sys.exit(main())
