"""The seed's cost models (``lep.cost``): formulas, worked examples, validation, fitting."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import lepton_ai as lep
from lepton_ai.monitor.cost import (
    Calibration,
    JobReport,
    JobTerms,
    SampleRuns,
    calibrate_job,
    consensus_terms,
    fit_line,
    job_terms,
)
from lepton_ai.monitor.estimate import cut_source, elections_from_timeline, source_items
from lepton_ai.monitor.estimate_report import latest_calibration

rates = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False)
times = st.floats(min_value=0.0, max_value=1e4, allow_nan=False)
items = st.floats(min_value=0.0, max_value=1e9, allow_nan=False)


def test_the_seed_worked_examples_exactly() -> None:
    assert lep.cost.job_time(N=1000, n=5, b=10, c=1000, r=5) == 25.2
    assert lep.cost.consensus_time(m=5, p=2, d=1, u=3, e=5) == 23
    t = job_terms(1000, 5, 10, 1000, 5)
    assert (t.transfer_s, t.compute_s, t.reduce_s) == (20.0, 0.2, 5.0)
    assert consensus_terms(5, 2, 1, 3, 5).update_s == 15.0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"b": 0}, "b"),
        ({"c": -1}, "c"),
        ({"n": 0}, "n"),
        ({"n": 0.5}, "n"),
        ({"N": math.nan}, "N"),
        ({"r": -1}, "r"),
        ({"b": math.inf}, "b"),
    ],
)
def test_job_time_rejects_bad_input_naming_it(kwargs: dict[str, float], name: str) -> None:
    args = {"N": 1000, "n": 5, "b": 10, "c": 1000, "r": 5} | kwargs
    with pytest.raises(ValueError, match=rf"^{name} must"):
        lep.cost.job_time(**args)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"m": 0}, "m"), ({"u": -0.1}, "u"), ({"e": math.nan}, "e"), ({"p": -1}, "p")],
)
def test_consensus_time_rejects_bad_input_naming_it(kwargs: dict[str, float], name: str) -> None:
    args = {"m": 5, "p": 2, "d": 1, "u": 3, "e": 5} | kwargs
    with pytest.raises(ValueError, match=rf"^{name} must"):
        lep.cost.consensus_time(**args)


def test_a_non_number_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="N must be a number"):
        lep.cost.job_time(N="1000", n=5, b=10, c=1000, r=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="n must be a number"):
        lep.cost.job_time(N=1000, n=True, b=10, c=1000, r=5)


@given(items, rates, rates, times, st.integers(min_value=1, max_value=1000))
def test_job_time_does_not_grow_with_more_nodes(
    n_items: float, b: float, c: float, r: float, n: int
) -> None:
    assert lep.cost.job_time(N=n_items, n=n + 1, b=b, c=c, r=r) <= lep.cost.job_time(
        N=n_items, n=n, b=b, c=c, r=r
    )
    assert lep.cost.job_time(N=n_items, n=n, b=b, c=c, r=r) >= r


@given(items, rates, rates, times, st.integers(min_value=1, max_value=1000))
def test_job_terms_sum_to_the_total(n_items: float, b: float, c: float, r: float, n: int) -> None:
    t = job_terms(n_items, n, b, c, r)
    assert math.isclose(t.total_s, t.transfer_s + t.compute_s + t.reduce_s)
    assert math.isclose(t.transfer_s * n * b, n_items, rel_tol=1e-9, abs_tol=1e-9)


@given(st.integers(min_value=1, max_value=99), times, times, times, times)
def test_consensus_time_grows_with_replicas(m: int, p: float, d: float, u: float, e: float) -> None:
    assert lep.cost.consensus_time(m=m + 1, p=p, d=d, u=u, e=e) >= lep.cost.consensus_time(
        m=m, p=p, d=d, u=u, e=e
    )


@given(
    st.floats(min_value=-1e3, max_value=1e3),
    st.floats(min_value=-1e3, max_value=1e3),
    st.lists(st.integers(min_value=0, max_value=10_000), min_size=2, max_size=20, unique=True),
)
def test_fit_line_recovers_a_line(slope: float, intercept: float, xs: list[int]) -> None:
    ys = [slope * x + intercept for x in xs]
    got_slope, got_intercept = fit_line([float(x) for x in xs], ys)
    assert math.isclose(got_slope, slope, rel_tol=1e-6, abs_tol=1e-6)
    assert math.isclose(got_intercept, intercept, rel_tol=1e-6, abs_tol=1e-3)


def test_fit_line_needs_two_distinct_points() -> None:
    with pytest.raises(ValueError, match="two distinct"):
        fit_line([1.0, 1.0], [2.0, 3.0])
    with pytest.raises(ValueError, match="2 x values but 1"):
        fit_line([1.0, 2.0], [2.0])


def test_calibration_from_sample_runs_reproduces_them() -> None:
    # 2 nodes; 1e-3 s per item for the cluster (read: 2e-4 of it); 0.5 s fixed.
    xs = [1000.0, 2000.0, 4000.0]
    runs = SampleRuns(xs, [0.5 + 1e-3 * x for x in xs], xs, [2e-4 * x for x in xs], 2)
    cal = calibrate_job(runs, items_per_byte=0.1)
    assert math.isclose(cal.b, 1 / (2 * 2e-4))
    assert math.isclose(cal.c, 1 / (2 * 8e-4))
    assert math.isclose(cal.r, 0.5)
    assert math.isclose(cal.predict(4000, 2).total_s, 4.5)  # its own largest run
    assert math.isclose(cal.predict(4000, 4).total_s, 2.5)  # twice the nodes
    assert cal.items_per_byte == 0.1 and "read-only" in cal.b_how


def test_calibration_keeps_rates_positive_under_noise() -> None:
    xs = [1000.0, 2000.0]
    # The read-only runs came out slower per item than the whole job: noise.
    cal = calibrate_job(SampleRuns(xs, [1.0, 2.0], xs, [1.0, 3.0], 1))
    assert cal.b > 0 and cal.c > 0
    assert math.isclose(1 / cal.b + 1 / cal.c, 1e-3)
    with pytest.raises(ValueError, match="did not take longer"):
        calibrate_job(SampleRuns(xs, [2.0, 1.0], xs, [0.1, 0.2], 1))


def test_calibration_validates_its_rates() -> None:
    with pytest.raises(ValueError, match=r"^c must"):
        Calibration(b=1.0, c=0.0, r=1.0, b_how="", c_how="", r_how="")


def test_report_table_shows_each_term_predicted_and_measured() -> None:
    cal = Calibration(b=10.0, c=1000.0, r=5.0, b_how="b", c_how="c", r_how="r", nodes=5)
    report = JobReport(
        "j1",
        1000.0,
        5,
        measured=JobTerms(22.0, 0.2, 5.0),
        predicted=cal.predict(1000, 5),
        calibration=cal,
        how={"total": "timeline"},
    )
    text = str(report)
    assert "transfer N/(n·b)" in text and "20.000" in text and "22.000" in text
    assert "-9%" in text  # transfer: 20 predicted against 22 measured
    assert "25.200" in text and "27.200" in text
    assert report.to_json()["predicted"] == {  # type: ignore[comparison-overlap]
        "transfer_s": 20.0,
        "compute_s": 0.2,
        "reduce_s": 5.0,
        "total_s": 25.2,
    }
    bare = JobReport("j2", None, 1, measured=JobTerms(0.0, 1.0, 0.5))
    assert "no calibration" in str(bare) and "—" in str(bare)


def test_sources_are_counted_and_cut() -> None:
    import pickle

    from lepton_ai.data.sources import InlineSource, RangeSource, TextSource

    assert source_items(RangeSource(0, 100, 2), 0.0) == 50
    assert cut_source(RangeSource(0, 100, 2), 0.5) == RangeSource(0, 50, 2)
    text = TextSource("/x.txt", 100, 300)
    assert source_items(text, 0.05) == 10
    assert cut_source(text, 0.25) == TextSource("/x.txt", 100, 150)
    inline = InlineSource(pickle.dumps([1, 2, 3, 4]), 4)
    half = cut_source(inline, 0.5)
    assert isinstance(half, InlineSource) and pickle.loads(half.data) == [1, 2] and half.count == 2


def test_elections_and_calibrations_are_read_from_the_timeline() -> None:
    events = [
        {"t": 1.0, "kind": "leader_elected", "detail": "a epoch 1"},
        {"t": 10.0, "kind": "fault_injected", "detail": "kill leader 0 pid 7 (SIGKILL)"},
        {"t": 10.5, "kind": "worker_lost", "detail": ""},
        {"t": 11.25, "kind": "leader_elected", "detail": "b epoch 2"},
        {"t": 20.0, "kind": "fault_injected", "detail": "kill worker 1 pid 8 (SIGKILL)"},
        {"t": 21.0, "kind": "leader_elected", "detail": "b epoch 3"},
    ]
    assert elections_from_timeline(events) == [1.25]
    cal = Calibration(b=2.0, c=3.0, r=0.5, b_how="x", c_how="y", r_how="z", nodes=2)
    import json

    found = latest_calibration(
        [*events, {"t": 30.0, "kind": "cost_calibrated", "detail": json.dumps(cal.to_json())}]
    )
    assert found == cal
    assert latest_calibration(events) is None
