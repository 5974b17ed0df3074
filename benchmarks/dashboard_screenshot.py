"""The README's dashboard screenshot, taken from a real cluster in headless chromium.

    .venv/bin/python benchmarks/dashboard_screenshot.py [--out docs/img/dashboard.png]

Starts a default cluster (3 coordinators, 2 workers) with a deployment, runs a
shuffle job with a worker SIGKILLed in the middle (so the timeline shows the
fault, its detection and the healing, and the task chart a retry), then logs in
at ``cluster.dashboard_url`` with the token, selects the job and saves the page.
Needs Debian's chromium and chromium-driver and selenium (the test extras).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cloudpickle

import lepton_ai as lep

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MODEL = "def predict(instances):\n    return [sum(x) for x in instances]\n"


def serve_traffic(urls: list[str], stop: threading.Event) -> None:
    client = lep.ServeClient(urls)
    i = 0
    while not stop.wait(0.01):  # ~100 requests/s
        client.predict([[i, 1]])
        i += 1


def slow_pair(x: int) -> tuple[int, int]:
    time.sleep(0.05)
    return x % 7, x


def browser(width: int, height: int) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    service = Service(executable_path=str(shutil.which("chromedriver")))
    return webdriver.Chrome(service=service, options=options)


def wait(what: str, check: Any, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page did not show {what} within {timeout_s} s")
        time.sleep(0.1)
    return value


def run_faulted_job(cluster: lep.LocalCluster) -> str:
    task = lep.DistributedTask(cluster, progress=False)
    job = (
        task.parallelize(range(400), partitions=40)
        .map(slow_pair)
        .reduce_by_key(lambda a, b: a + b, partitions=4)
        .submit()
    )
    time.sleep(0.6)
    cluster.kill("worker", 1)
    result = dict(job.result(timeout=120))
    expected: dict[int, int] = {}
    for x in range(400):
        expected[x % 7] = expected.get(x % 7, 0) + x
    if result != expected:
        raise AssertionError("the job's answer is wrong")
    return job.id


def shoot(cluster: lep.LocalCluster, job_id: str, out: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = browser(1400, 1900)
    try:
        driver.get(cluster.dashboard_url + "login")
        driver.find_element(By.ID, "token").send_keys(cluster.token)
        driver.find_element(By.CSS_SELECTOR, "form button, form input[type=submit]").click()
        wait("the members", lambda: driver.find_elements(By.CSS_SELECTOR, "#members tr"))
        row = f"#jobs tr[data-job-id='{job_id}']"
        wait("the job", lambda: driver.find_elements(By.CSS_SELECTOR, row))
        driver.find_element(By.CSS_SELECTOR, row).click()
        wait("the task chart", lambda: driver.find_elements(By.CSS_SELECTOR, "svg rect"))
        time.sleep(2.5)  # two more polls: the rates have a previous reading
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/img/dashboard.png")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, lep.LocalCluster(workers=2) as cluster:
        model = Path(tmp, "model.py")
        model.write_text(MODEL)
        dep = lep.Deployment(f"{model}:predict", replicas=2, cluster=cluster, name="adder")
        dep.wait_ready(60)
        cluster.storage.put("models/adder.py", MODEL.encode(), replicas=2)
        stop = threading.Event()
        traffic = threading.Thread(target=serve_traffic, args=(dep.urls, stop), daemon=True)
        traffic.start()  # the deployment panel's requests/s and latency
        try:
            job_id = run_faulted_job(cluster)
            shoot(cluster, job_id, Path(args.out))
        finally:
            stop.set()
            traffic.join()
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
