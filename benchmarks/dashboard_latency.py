"""The dashboard: first paint, event-to-screen latency, and what 100 viewers cost.

    .venv/bin/python benchmarks/dashboard_latency.py [--loads 5] [--probes 20] [--viewers 100]

``LocalCluster(workers=2)`` (3 coordinators), the dashboard served standalone over
``ClusterSource`` on 127.0.0.1, Debian's headless chromium through selenium:

* first paint: ``--loads`` page loads after login; navigation start to the first
  contentful paint and to the first snapshot rendered (``window.__lepton``);
* update latency: ``--probes`` events recorded in the cluster at random moments
  (``cluster.record_event``), then a worker SIGKILLed; for each, the event's
  timestamp in the cluster to its first appearance on the page (the page polls
  once a second, the server keeps a snapshot 0.5 s);
* viewers: ``--viewers`` clients poll ``api/snapshot`` once a second for
  ``--viewers-s``: how many snapshots the cluster was asked for, and the answer
  time the viewers saw.

Results: JSON on stdout (``--out FILE`` too) and a short table on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

import lepton_ai as lep
from lepton_ai.monitor.dashboard import dashboard_app
from lepton_ai.monitor.dashboard_server import DashboardServer
from lepton_ai.monitor.dashboard_source import ClusterSource

PAGE_WAIT_S = 30.0


class CountingSource(ClusterSource):
    """Counts the snapshots the cluster is asked for."""

    def __init__(self, cluster: Any) -> None:
        super().__init__(cluster)
        self.fetches = 0
        self.lock = threading.Lock()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            self.fetches += 1
        return super().snapshot()


def browser(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    service = Service(executable_path=shutil.which("chromedriver") or "chromedriver")
    return webdriver.Chrome(service=service, options=options)


def wait_for(what: str, check: Any) -> Any:
    deadline = time.monotonic() + PAGE_WAIT_S
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"the page did not show {what} within {PAGE_WAIT_S} s")


def log_in(driver: Any, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait_for("the login form", lambda: driver.find_elements(By.ID, "token"))
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login-submit").click()
    wait_for("a render", lambda: driver.execute_script("return window.__lepton?.renders > 0"))


def first_paints(driver: Any, url: str, loads: int) -> list[dict[str, float]]:
    out = []
    for _ in range(loads):
        driver.get(url)
        wait_for("a render", lambda: driver.execute_script("return window.__lepton?.renders > 0"))
        fcp = driver.execute_script(
            "const e = performance.getEntriesByName('first-contentful-paint')[0];"
            "return e ? e.startTime : null"
        )
        render = driver.execute_script("return window.__lepton.firstRenderMs")
        out.append({"first_contentful_paint_ms": fcp, "first_data_render_ms": render})
    return out


def probe_lags(driver: Any, cluster: lep.LocalCluster, probes: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    for i in range(probes):
        time.sleep(rng.uniform(0.3, 1.3))  # not in step with the page's polling
        cluster.record_event("dashboard_probe", f"probe {i}")
    wait_for(
        "every probe",
        lambda: (
            driver.execute_script(
                "return window.__lepton.eventLagMs.filter(x => x.kind === 'dashboard_probe').length"
            )
            >= probes
        ),
    )
    lags = driver.execute_script("return window.__lepton.eventLagMs")
    return [float(x["lagMs"]) for x in lags if x["kind"] == "dashboard_probe"]


def fault_lag(driver: Any, cluster: lep.LocalCluster) -> float:
    cluster.kill("worker", 1)
    script = "return window.__lepton.eventLagMs.find(x => x.kind === 'worker_lost')"
    found = wait_for("worker_lost", lambda: driver.execute_script(script))
    return float(found["lagMs"])


async def viewers(url: str, token: str, n: int, seconds: float) -> list[float]:
    """``n`` clients, each polling once a second; the answer times they saw."""
    times: list[float] = []
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10.0) as client:
        login = await client.post("login", data={"token": token})
        if login.status_code != 303:  # a login answers with a redirect to the page
            raise RuntimeError(f"login failed: HTTP {login.status_code}")

        async def one() -> None:
            await asyncio.sleep(random.random())  # tabs opened at different moments
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t0 = time.monotonic()
                reply = await client.get("api/snapshot")
                reply.raise_for_status()
                times.append((time.monotonic() - t0) * 1000)
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))

        await asyncio.gather(*(one() for _ in range(n)))
    return times


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered), 1),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 1),
        "max": round(ordered[-1], 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with lep.LocalCluster(workers=2) as cluster, tempfile.TemporaryDirectory() as tmp:
        source = CountingSource(cluster)
        with DashboardServer(dashboard_app(source, cluster.token)) as server:
            driver = browser(Path(tmp) / "profile")
            try:
                log_in(driver, server.url, cluster.token)
                paints = first_paints(driver, server.url, args.loads)
                probes = probe_lags(driver, cluster, args.probes, args.seed)
                fault = fault_lag(driver, cluster)
            finally:
                driver.quit()
            before = source.fetches
            load = viewers(server.url, cluster.token, args.viewers, args.viewers_s)
            answer_ms = asyncio.run(load)
            fetched = source.fetches - before
    return {
        "first_contentful_paint_ms": summary([p["first_contentful_paint_ms"] for p in paints]),
        "first_data_render_ms": summary([p["first_data_render_ms"] for p in paints]),
        "event_to_page_ms": summary(probes),
        "worker_lost_to_page_ms": round(fault, 1),
        "viewers": {
            "clients": args.viewers,
            "seconds": args.viewers_s,
            "requests": len(answer_ms),
            "snapshots_fetched": fetched,
            "answer_ms": summary(answer_ms),
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--viewers", type=int, default=100)
    parser.add_argument("--viewers-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    v = result["viewers"]
    print(
        f"first paint (FCP) median {result['first_contentful_paint_ms']['median']} ms, "
        f"first data {result['first_data_render_ms']['median']} ms; "
        f"event->page median {result['event_to_page_ms']['median']} ms "
        f"(p90 {result['event_to_page_ms']['p90']}, max {result['event_to_page_ms']['max']}); "
        f"worker_lost->page {result['worker_lost_to_page_ms']} ms; "
        f"{v['clients']} viewers x {v['seconds']:g} s: {v['requests']} requests, "
        f"{v['snapshots_fetched']} snapshots fetched, answer median {v['answer_ms']['median']} ms",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
