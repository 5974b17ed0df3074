"""The seed's cost models, as pure functions (``lep.cost``).

    lep.cost.job_time(N=1000, n=5, b=10, c=1000, r=5)       # 25.2 s
    lep.cost.consensus_time(m=5, p=2, d=1, u=3, e=5)        # 23 s

Job time ``T = N/(n·b) + N/(n·c) + r``: ``N`` input items, ``n`` worker nodes,
``b`` a node's transfer rate and ``c`` its compute rate (items/s), ``r`` the
time that does not shrink with more nodes (s). Consensus time
``T' = p + d + m·u + e``: ``m`` replicas, propose ``p``, decide ``d``,
per-replica update ``u`` and election ``e`` times (s).

Besides the formulas: the records a report shows (``Calibration``,
``JobTerms``, ``JobReport``, ``ConsensusTerms``) and the arithmetic that turns
measurements into a calibration (``fit_line``, ``calibrate_job``). Measuring is
``monitor.estimate``'s; nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

# A calibration's per-item share below this fraction of the whole per-item time
# is within the timing noise of two short jobs: it is held at this floor so
# that a rate stays finite and positive instead of flipping sign with noise.
SHARE_FLOOR = 0.02


# ---------------------------------------------------------------- validation


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    x = float(value)
    if math.isnan(x):
        raise ValueError(f"{name} must be a number, got NaN")
    if math.isinf(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def _positive(name: str, value: object) -> float:
    x = _number(name, value)
    if x <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return x


def _non_negative(name: str, value: object) -> float:
    x = _number(name, value)
    if x < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return x


def _at_least_one(name: str, value: object) -> float:
    x = _number(name, value)
    if x < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return x


# ---------------------------------------------------------------- the formulas


@dataclass(frozen=True)
class JobTerms:
    """The three terms of ``T`` in seconds; ``total`` is their sum."""

    transfer_s: float  # N/(n·b)
    compute_s: float  # N/(n·c)
    reduce_s: float  # r

    @property
    def total_s(self) -> float:
        return self.transfer_s + self.compute_s + self.reduce_s


def job_terms(N: float, n: float, b: float, c: float, r: float) -> JobTerms:
    """``T``'s terms; ValueError naming the argument for NaN, n < 1, b or c <= 0, N or r < 0."""
    items = _non_negative("N", N)
    nodes = _at_least_one("n", n)
    transfer_rate = _positive("b", b)
    compute_rate = _positive("c", c)
    fixed = _non_negative("r", r)
    return JobTerms(items / (nodes * transfer_rate), items / (nodes * compute_rate), fixed)


def job_time(N: float, n: float, b: float, c: float, r: float) -> float:
    """``T = N/(n·b) + N/(n·c) + r`` seconds (the seed's job time)."""
    return job_terms(N, n, b, c, r).total_s


@dataclass(frozen=True)
class ConsensusTerms:
    """The terms of ``T'`` in seconds."""

    propose_s: float  # p
    decide_s: float  # d
    update_s: float  # m·u
    election_s: float  # e

    @property
    def total_s(self) -> float:
        return self.propose_s + self.decide_s + self.update_s + self.election_s


def consensus_terms(m: float, p: float, d: float, u: float, e: float) -> ConsensusTerms:
    """``T'``'s terms; ValueError naming the argument for NaN, m < 1 or a negative time."""
    replicas = _at_least_one("m", m)
    return ConsensusTerms(
        _non_negative("p", p),
        _non_negative("d", d),
        replicas * _non_negative("u", u),
        _non_negative("e", e),
    )


def consensus_time(m: float, p: float, d: float, u: float, e: float) -> float:
    """``T' = p + d + m·u + e`` seconds (the seed's consensus time)."""
    return consensus_terms(m, p, d, u, e).total_s


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """Measured ``b``, ``c``, ``r`` and how each was measured.

    ``nodes`` is how many worker nodes the measuring cluster had;
    ``items_per_byte`` converts a text input's size to items (0: not known).
    """

    b: float
    c: float
    r: float
    b_how: str
    c_how: str
    r_how: str
    nodes: int = 1
    items_per_byte: float = 0.0

    def __post_init__(self) -> None:
        _positive("b", self.b)
        _positive("c", self.c)
        _non_negative("r", self.r)
        _at_least_one("nodes", self.nodes)
        _non_negative("items_per_byte", self.items_per_byte)

    def predict(self, N: float, n: float) -> JobTerms:
        return job_terms(N, n, self.b, self.c, self.r)

    def to_json(self) -> dict[str, float | int | str]:
        return {
            "b": self.b,
            "c": self.c,
            "r": self.r,
            "b_how": self.b_how,
            "c_how": self.c_how,
            "r_how": self.r_how,
            "nodes": self.nodes,
            "items_per_byte": self.items_per_byte,
        }


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)`` of ``y = slope·x + intercept``.

    ValueError for fewer than two distinct x, or lengths that differ.
    """
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values but {len(ys)} y values")
    if len(set(xs)) < 2:
        raise ValueError("a line needs points at two distinct x values at least")
    mean_x = sum(xs) / len(xs)
    mean_y = sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    return slope, mean_y - slope * mean_x


@dataclass(frozen=True)
class SampleRuns:
    """Wall times of sample jobs: the whole job (``job_s``) and its input read alone
    (``read_s``) at ``items[i]`` input items, on a cluster of ``nodes`` nodes."""

    items: Sequence[float]
    job_s: Sequence[float]
    read_items: Sequence[float]
    read_s: Sequence[float]
    nodes: int


def calibrate_job(runs: SampleRuns, items_per_byte: float = 0.0) -> Calibration:
    """``b``, ``c``, ``r`` from sample runs.

    The job's time against its input size is a line: the slope is the cluster's
    time per item, the intercept (the time at no input) is ``r``. The read-only
    runs' slope is the transfer's share of that time per item; the rest is
    compute. A cluster of ``nodes`` nodes moved the items in parallel, so a
    node's rate is ``1 / (nodes · seconds per item)``.
    """
    nodes = int(_at_least_one("nodes", runs.nodes))
    per_item_s, r = fit_line(runs.items, runs.job_s)
    if per_item_s <= 0:
        raise ValueError(
            "the sample runs did not take longer with more input: the sample is too "
            "small to measure against the timing noise"
        )
    read_per_item_s, _ = fit_line(runs.read_items, runs.read_s)
    floor = SHARE_FLOOR * per_item_s
    transfer_item_s = min(max(read_per_item_s, floor), per_item_s - floor)
    compute_item_s = per_item_s - transfer_item_s
    return Calibration(
        b=1.0 / (nodes * transfer_item_s),
        c=1.0 / (nodes * compute_item_s),
        r=max(r, 0.0),
        b_how=(
            f"slope of {len(runs.read_s)} read-only sample jobs (the job's input, no "
            f"function applied) over {nodes} node(s)"
        ),
        c_how=(
            f"slope of {len(runs.job_s)} sample runs of the whole job, less the "
            f"transfer share, over {nodes} node(s)"
        ),
        r_how="intercept of the same runs: the job's time at no input",
        nodes=nodes,
        items_per_byte=items_per_byte,
    )


# ---------------------------------------------------------------- reports


def _cell(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _error(predicted: float | None, measured: float | None) -> str:
    if predicted is None or measured is None or measured <= 0:
        return "—"
    return f"{100.0 * (predicted - measured) / measured:+.0f}%"


@dataclass(frozen=True)
class JobReport:
    """A finished job's cost-model terms, predicted and measured (``Job.report()``).

    ``predicted`` is None without a calibration; ``how`` says how each measured
    term was taken, by term name (``transfer``, ``compute``, ``reduce``, ``total``).
    """

    job_id: str
    N: float | None
    n: int
    measured: JobTerms
    predicted: JobTerms | None = None
    calibration: Calibration | None = None
    how: dict[str, str] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, float | None, float]]:
        p, m = self.predicted, self.measured
        return [
            ("transfer N/(n·b)", None if p is None else p.transfer_s, m.transfer_s),
            ("compute N/(n·c)", None if p is None else p.compute_s, m.compute_s),
            ("reduce r", None if p is None else p.reduce_s, m.reduce_s),
            ("total T", None if p is None else p.total_s, m.total_s),
        ]

    def __str__(self) -> str:
        items = "unknown" if self.N is None else f"{self.N:,.0f}"
        lines = [
            f"job {self.job_id}: N={items} items, n={self.n} node(s)",
            f"{'term':<18}{'predicted s':>12}{'measured s':>12}{'error':>8}",
        ]
        for name, pred, meas in self.rows():
            lines.append(f"{name:<18}{_cell(pred):>12}{_cell(meas):>12}{_error(pred, meas):>8}")
        if self.calibration is None:
            lines.append("predicted: no calibration (run `lepton estimate job FILE` first)")
        else:
            cal = self.calibration
            lines.append(f"calibration: b={cal.b:,.1f} c={cal.c:,.1f} items/s, r={cal.r:.3f} s")
        lines += [f"measured {name}: {how}" for name, how in self.how.items()]
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        def terms(t: JobTerms | None) -> dict[str, float] | None:
            if t is None:
                return None
            return {
                "transfer_s": t.transfer_s,
                "compute_s": t.compute_s,
                "reduce_s": t.reduce_s,
                "total_s": t.total_s,
            }

        return {
            "job_id": self.job_id,
            "N": self.N,
            "n": self.n,
            "predicted": terms(self.predicted),
            "measured": terms(self.measured),
            "calibration": None if self.calibration is None else self.calibration.to_json(),
            "how": dict(self.how),
        }
