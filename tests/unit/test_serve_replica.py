"""The replica app in-process (starlette TestClient / httpx ASGI transport) and TARGET loading."""

from __future__ import annotations

import asyncio
import pickle
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from lepton_ai.serve.config import ReplicaConfig
from lepton_ai.serve.replica import ReplicaState, build_app, parse_instances
from lepton_ai.serve.target import Target, TargetError, check_target, load_target


def _target(fn: Any, n_features: int | None = None) -> Target:
    return Target("test", fn, n_features)


def _client(fn: Any, n_features: int | None = None, **config: Any) -> TestClient:
    return TestClient(build_app(_target(fn, n_features), ReplicaConfig(**config)))


def test_predict_v1_convention_with_numpy_output() -> None:
    with _client(lambda xs: np.asarray(xs).sum(axis=1)) as client:
        resp = client.post("/predict", json={"instances": [[1, 2], [3, 4.5]]})
        assert resp.status_code == 200
        assert resp.json() == {"predictions": [3.0, 7.5]}
        assert client.post("/predict", json={"instances": []}).json() == {"predictions": []}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"inputs": [[1, 2]]}', "expected a JSON object"),
        (b'{"instances": 5}', "must be a list"),
        (b'{"instances": [[1, 2], [3]]}', "ragged"),
        (b'{"instances": [[1, 2], 3]}', "mix"),
        (b'{"instances": [[1, 2, 3]]}', "needs 2 features"),
        (b"\xff\xfe", "malformed JSON"),
        (b'{"instances": [["a", 2]]}', "not a number"),  # the model declares numbers
        (b'{"instances": [[1e400, 2]]}', "out of range"),
        (b'{"instances": [[NaN, 2]]}', "not a number JSON allows"),
        (b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deep"),
    ],
)
def test_bad_input_is_400_with_a_message(body: bytes, fragment: str) -> None:
    calls: list[Any] = []
    with _client(calls.append, n_features=2) as client:
        resp = client.post("/predict", content=body)
        assert resp.status_code == 400
        assert fragment in resp.json()["error"]
    assert calls == []  # the model never saw it


def test_oversized_body_is_413_declared_or_streamed() -> None:
    with _client(lambda xs: xs, body_bytes_max=100) as client:
        big = b'{"instances": [' + b"1," * 100 + b"1]}"
        assert client.post("/predict", content=big).status_code == 413

        def chunks() -> Any:  # no Content-Length: the replica counts as it reads
            yield big[:60]
            yield big[60:]

        assert client.post("/predict", content=chunks()).status_code == 413
        assert client.post("/predict", json={"instances": [1]}).status_code == 200


def test_too_many_instances_is_400() -> None:
    with _client(lambda xs: xs, instances_max=3) as client:
        assert client.post("/predict", json={"instances": [1, 2, 3, 4]}).status_code == 400


def test_model_exception_is_500_with_error_id_and_the_replica_keeps_serving() -> None:
    def flaky(xs: list[Any]) -> list[Any]:
        if xs == ["boom"]:
            raise ZeroDivisionError("bad luck")
        return xs

    with _client(flaky) as client:
        resp = client.post("/predict", json={"instances": ["boom"]})
        assert resp.status_code == 500
        doc = resp.json()
        assert "ZeroDivisionError" in doc["error"] and len(doc["error_id"]) == 12
        assert client.post("/predict", json={"instances": ["ok"]}).json() == {"predictions": ["ok"]}
        assert client.get("/healthz").status_code == 200


def test_input_the_model_rejects_is_400_and_bad_output_is_json_500() -> None:
    """A TypeError/ValueError from the model on these instances is the input's fault:
    400, never counted against the replica by the balancer; NaN in the output is a
    JSON 500, never a plain-text traceback."""

    def picky(xs: list[Any]) -> list[Any]:
        return [float(x) for x in xs]  # ValueError on "abc"

    with _client(picky) as client:
        bad = client.post("/predict", json={"instances": ["abc"]})
        assert bad.status_code == 400 and "rejected the input" in bad.json()["error"]
        nan = client.post("/predict", json={"instances": ["nan"]})
        assert nan.status_code == 500 and "JSON cannot carry" in nan.json()["error"]
        assert client.post("/predict", json={"instances": ["1.5"]}).json() == {"predictions": [1.5]}


def test_wrong_prediction_count_is_500() -> None:
    with _client(lambda xs: [1]) as client:
        resp = client.post("/predict", json={"instances": [1, 2]})
        assert resp.status_code == 500 and "1 predictions for 2" in resp.json()["error"]


def test_health_readiness_draining_and_metrics() -> None:
    state = ReplicaState(ready=False)
    app = build_app(_target(lambda xs: xs), ReplicaConfig(), state)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503  # still loading
        state.ready = True
        assert client.get("/readyz").status_code == 200
        client.post("/predict", json={"instances": [1, 2]})
        client.post("/predict", content=b"nope")
        state.draining = True
        assert client.get("/readyz").json() == {"status": "draining"}
        text = client.get("/metrics").text
        assert 'lepton_replica_requests_total{code="200"} 1.0' in text
        assert 'lepton_replica_requests_total{code="400"} 1.0' in text
        assert "lepton_replica_request_seconds_count 2.0" in text


def test_micro_batching_groups_concurrent_requests() -> None:
    batches: list[int] = []
    lock = threading.Lock()

    def model(xs: list[int]) -> list[int]:
        with lock:
            batches.append(len(xs))
        return [x * 10 for x in xs]

    app = build_app(_target(model), ReplicaConfig(max_batch_size=8, max_wait_ms=50))

    async def scenario() -> list[Any]:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://replica") as client,
        ):
            requests = [client.post("/predict", json={"instances": [i, i + 100]}) for i in range(6)]
            return [r.json()["predictions"] for r in await asyncio.gather(*requests)]

    results = asyncio.run(scenario())
    assert results == [[i * 10, (i + 100) * 10] for i in range(6)]  # each gets its own slice
    assert sum(batches) == 12 and max(batches) <= 8 and len(batches) < 6


def test_parse_instances_accepts_scalars_and_dicts() -> None:
    config = ReplicaConfig()
    assert parse_instances(b'{"instances": [1, "a", {"x": 1}]}', config, None) == [1, "a", {"x": 1}]


# -- TARGET forms -------------------------------------------------------------------------


def test_file_target_with_setup_called_once(tmp_path: Path) -> None:
    path = tmp_path / "model_with_setup.py"
    path.write_text(
        "CALLS = []\n"
        "def setup():\n    CALLS.append(1)\n"
        "def predict(xs):\n    return [len(CALLS)] * len(xs)\n"
    )
    check_target(f"{path}:predict")  # import only: no setup
    target = load_target(f"{path}:predict")
    assert target.predict([1, 2]) == [1, 1]


def test_module_target_and_estimator_object(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "mymodels.py").write_text(
        "from sklearn.linear_model import LogisticRegression\n"
        "clf = LogisticRegression().fit([[0.0], [1.0], [2.0], [3.0]], [0, 0, 1, 1])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    target = load_target("mymodels:clf")  # an object with predict()
    assert list(target.predict([[0.0], [3.0]])) == [0, 1]
    assert target.n_features == 1


def test_pickle_and_joblib_model_files(tmp_path: Path) -> None:
    import joblib
    from sklearn.tree import DecisionTreeClassifier

    model = DecisionTreeClassifier(random_state=0).fit([[0, 0], [1, 1]], [0, 1])
    pkl, jbl = tmp_path / "m.pkl", tmp_path / "m.joblib"
    pkl.write_bytes(pickle.dumps(model))
    joblib.dump(model, jbl)
    for path in (pkl, jbl):
        check_target(str(path))
        target = load_target(str(path))
        assert list(target.predict([[1, 1], [0, 0]])) == [1, 0]
        assert target.n_features == 2


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "TARGET must be"),
        ("no_colon_here", "expected 'module:callable'"),
        ("nosuchmodule_xyz:predict", "No module named"),
        ("json:nosuchattr", "has no attribute"),
        ("json:__doc__", "neither callable"),
        ("/nonexistent/model.py:predict", "does not exist"),
        ("/nonexistent/model.pkl", "does not exist"),
    ],
)
def test_bad_targets_fail_with_the_reason(spec: str, fragment: str) -> None:
    with pytest.raises(TargetError, match=fragment):
        check_target(spec)


def test_target_whose_import_or_setup_raises(tmp_path: Path) -> None:
    broken = tmp_path / "broken_import.py"
    broken.write_text("raise RuntimeError('cannot load weights')\ndef predict(xs): return xs\n")
    with pytest.raises(TargetError, match="cannot load weights"):
        check_target(f"{broken}:predict")
    bad_setup = tmp_path / "bad_setup.py"
    bad_setup.write_text("def setup():\n    1 / 0\ndef predict(xs): return xs\n")
    check_target(f"{bad_setup}:predict")  # importable...
    with pytest.raises(TargetError, match="setup"):
        load_target(f"{bad_setup}:predict")  # ...but a replica cannot load it
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(TargetError, match="loading model"):
        load_target(str(garbage))


def test_unknown_path_and_method_are_json() -> None:
    with _client(lambda xs: xs) as client:
        missing = client.get("/nope")
        assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
        wrong = client.get("/predict")
        assert wrong.status_code == 405 and wrong.json()["error"] == "Method Not Allowed"
        assert "POST" in wrong.headers["allow"]
