"""The dashboard in a real headless browser (Debian's chromium + chromedriver, selenium).

Log in through the form (a wrong token shows no data), see the members, watch a
job's progress reach 100%, kill a worker and see the fault and the recovery on
the event timeline. Measures first paint and the lag from an event happening in
the cluster to it being on the page. A failure leaves a screenshot in the test's
tmp dir.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import lepton_ai as lep
from helpers import wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver)",
    ),
]

PAGE_WAIT_S = 30.0  # how long the page may take to show a change
JOB_TASK_S = 1.0


def slow_double(x: int) -> int:
    time.sleep(JOB_TASK_S)
    return 2 * x


def _browser(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the tests may run as root (CI containers)
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1100",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[lep.LocalCluster, str, Any]]:
    """The dashboard as the leading coordinator serves it (``cluster.dashboard_url``)."""
    with lep.LocalCluster(workers=2) as cluster:
        url = cluster.dashboard_url
        driver = _browser(tmp_path / "chromium-profile")
        driver.set_script_timeout(10)
        try:
            yield cluster, url, driver
        finally:
            driver.quit()


def _log_in(driver: Any, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait_until(
        lambda: driver.find_elements(By.ID, "token"), PAGE_WAIT_S, "the page showing the login form"
    )
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login-submit").click()


def _texts(driver: Any, css: str) -> list[str]:
    """The text of every element ``css`` selects, read in one go: the page redraws its
    tables every second, so element handles kept across calls would go stale."""
    return list(
        driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", css
        )
    )


def _job_row(driver: Any, job_id: str) -> tuple[str, str] | None:
    found = driver.execute_script(
        "const r = document.querySelector(`#jobs tr[data-job-id='${arguments[0]}']`);"
        "return r ? [r.dataset.status, r.querySelector('.progress').textContent] : null",
        job_id,
    )
    return None if found is None else (str(found[0]), str(found[1]))


def _api_status(driver: Any) -> int:
    return int(
        driver.execute_async_script(
            "const done = arguments[0];"
            "fetch('api/snapshot', {credentials: 'same-origin'}).then(r => done(r.status));"
        )
    )


def _check_login(cluster: lep.LocalCluster, url: str, driver: Any) -> dict[str, float]:
    from selenium.webdriver.common.by import By

    # A wrong token: the form again, an error, and still no data.
    _log_in(driver, url, "wrong-" + cluster.token)
    wait_until(
        lambda: driver.find_elements(By.ID, "login-error"),
        PAGE_WAIT_S,
        "the page showing the login error",
    )
    assert "Wrong token" in driver.page_source
    assert not driver.find_elements(By.ID, "members")
    assert cluster.address not in driver.page_source
    assert _api_status(driver) == 401

    # The right one: the members appear.
    clicked = time.monotonic()
    _log_in(driver, url, cluster.token)
    wait_until(
        lambda: len(_texts(driver, "#members tr[data-role=coordinator]")) == 3,
        PAGE_WAIT_S,
        "the page showing 3 coordinators",
    )
    wait_until(
        lambda: len(_texts(driver, "#members tr[data-role=worker]")) == 2,
        PAGE_WAIT_S,
        "the page showing 2 workers",
    )
    login_to_members_s = time.monotonic() - clicked
    first_render_ms = driver.execute_script("return window.__lepton.firstRenderMs")
    assert _api_status(driver) == 200
    cookies = driver.get_cookies()
    assert cookies and all(c["httpOnly"] and c["sameSite"] == "Strict" for c in cookies)
    assert all(cluster.token not in c["value"] for c in cookies)
    return {
        "first_render_ms": round(first_render_ms, 1),
        "login_to_members_s": round(login_to_members_s, 3),
    }


def _check_job(cluster: lep.LocalCluster, driver: Any) -> None:
    """A job that takes a few seconds: its progress goes to 100%."""
    ds = lep.DistributedTask(cluster).parallelize(range(8), partitions=8).map(slow_double)
    job = ds.submit()
    statuses: set[str] = set()

    def finished() -> bool:
        found = _job_row(driver, job.id)
        if found is not None:
            statuses.add(found[0])
        return found is not None and "(100%)" in found[1]

    wait_until(finished, 60.0, f"the page showing job {job.id} at 100%")
    assert sorted(job.result(timeout=30)) == [2 * x for x in range(8)]
    assert "running" in statuses, statuses  # seen on its way, not only at the end
    if hasattr(cluster, "job_tasks"):  # the task timeline: a bar per attempt
        done = wait_until(
            lambda: _texts(driver, "#timeline rect.succeeded"),
            PAGE_WAIT_S,
            "the page showing the task timeline",
        )
        wait_until(
            lambda: len(_texts(driver, "#timeline rect.succeeded")) >= 8,
            PAGE_WAIT_S,
            "the page showing 8 succeeded tasks",
        )
        assert "stage 0 partition" in done[0]
    else:
        assert _texts(driver, "#timeline-box[hidden]")  # no timing API: no chart


def _check_fault(cluster: lep.LocalCluster, driver: Any) -> dict[str, float]:
    """A worker killed: the fault and the recovery, on the event timeline."""
    killed_at = time.time()
    cluster.kill("worker", 1)
    lost = wait_until(
        lambda: _texts(driver, "#events li[data-kind=worker_lost]"),
        PAGE_WAIT_S,
        "the page showing worker_lost",
    )
    fault_visible_s = time.time() - killed_at
    assert "worker_lost 1 (" in lost[0], lost
    wait_until(
        lambda: (
            _texts(driver, "#events li[data-kind=member_restarted]")
            and len(_texts(driver, "#events li[data-kind=worker_joined]")) >= 3
        ),
        PAGE_WAIT_S,
        "the page showing the worker's restart",
    )
    lags = driver.execute_script("return window.__lepton.eventLagMs")
    lost_lag_ms = next(x["lagMs"] for x in lags if x["kind"] == "worker_lost")
    return {
        "kill_to_worker_lost_visible_s": round(fault_visible_s, 3),
        "worker_lost_event_to_page_ms": round(lost_lag_ms, 1),
    }


def test_dashboard_in_a_browser(setup: tuple[lep.LocalCluster, str, Any], tmp_path: Path) -> None:
    cluster, url, driver = setup
    try:
        figures = _check_login(cluster, url, driver)
        _check_job(cluster, driver)
        figures |= _check_fault(cluster, driver)
    except BaseException:
        # What the page showed when it went wrong, next to the test's other files.
        driver.save_screenshot(str(tmp_path / "dashboard-failure.png"))
        (tmp_path / "dashboard-failure.html").write_text(driver.page_source)
        print(f"screenshot: {tmp_path / 'dashboard-failure.png'}")
        raise
    (tmp_path / "dashboard-latency.json").write_text(json.dumps(figures))
    print("dashboard latency:", json.dumps(figures))
    # One poll (1 s) plus one cache period (0.5 s), with room for a loaded machine.
    assert figures["worker_lost_event_to_page_ms"] < 5000, figures
