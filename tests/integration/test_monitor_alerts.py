"""Alerts on a real default cluster: a worker down raises node_down on the timeline
and at a webhook (retried after the receiver's 500), and clears once it is back; a
failed job raises job_failed."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cloudpickle
import pytest

import lepton_ai as lep
from helpers import wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.slow


class Receiver:
    """An HTTP receiver on 127.0.0.1 that answers its first POST with 500 (to be
    retried) and keeps every document it accepted."""

    def __init__(self) -> None:
        self.docs: list[dict[str, Any]] = []
        self.posts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.posts += 1
                if receiver.posts == 1:
                    self.send_response(500)
                else:
                    receiver.docs.append(json.loads(body))
                    self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def cluster(receiver: Receiver) -> Iterator[lep.LocalCluster]:
    with lep.LocalCluster(workers=2, restart=False, alert_webhook=receiver.url) as c:
        yield c


def alert_events(cluster: lep.LocalCluster, kind: str, key: str) -> list[dict[str, Any]]:
    return [e for e in cluster.events() if e["kind"] == kind and f" {key}:" in e["detail"]]


def test_a_worker_down_raises_node_down_and_its_return_clears_it(
    cluster: lep.LocalCluster, receiver: Receiver
) -> None:
    assert not alert_events(cluster, "alert_raised", "node_down:1")
    cluster.kill("worker", 1)
    wait_until(lambda: alert_events(cluster, "alert_raised", "node_down:1"), 20.0, "node_down")
    wait_until(
        lambda: any(d["labels"]["alertname"] == "node_down" for d in receiver.docs),
        20.0,
        "the webhook's firing notification (after one retry)",
    )
    firing = next(d for d in receiver.docs if d["labels"]["alertname"] == "node_down")
    assert firing["status"] == "firing"
    assert firing["labels"] == {"alertname": "node_down", "severity": "warning", "subject": "1"}
    assert receiver.posts >= 2  # the first POST got a 500 and was retried
    cluster.restart("worker", 1)
    wait_until(lambda: alert_events(cluster, "alert_cleared", "node_down:1"), 30.0, "cleared")
    wait_until(
        lambda: any(
            d["status"] == "resolved" and d["labels"]["alertname"] == "node_down"
            for d in receiver.docs
        ),
        20.0,
        "the webhook's resolved notification",
    )
    # Raised once and cleared once, not once per evaluation.
    assert len(alert_events(cluster, "alert_raised", "node_down:1")) == 1
    assert len(alert_events(cluster, "alert_cleared", "node_down:1")) == 1
    # The coordinators finding each other at start-up (seconds ago) raised nothing.
    assert not [e for e in cluster.events() if "quorum_at_risk" in e["detail"]]


def boom(x: int) -> int:
    raise ValueError(f"bad record {x}")


def test_a_failed_job_raises_job_failed(cluster: lep.LocalCluster) -> None:
    job = lep.DistributedTask(cluster).parallelize(range(4), partitions=2).map(boom).submit()
    with pytest.raises(lep.TaskError) as failed:
        job.result(timeout=60)
    # The remote traceback names this file and the line that raised.
    assert f'File "{__file__}"' in failed.value.remote_traceback
    assert 'raise ValueError(f"bad record {x}")' in failed.value.remote_traceback
    wait_until(
        lambda: alert_events(cluster, "alert_raised", f"job_failed:{job.id}"), 20.0, "job_failed"
    )
    raised = alert_events(cluster, "alert_raised", f"job_failed:{job.id}")
    assert raised[0]["job_id"] == job.id
    assert raised[0]["detail"].startswith("warning ")
