"""The log analysis job of ``lepton demo``.

It finds requests and error rate per service and status code, and the top URLs.

The distributed form is MapReduce with a combiner: ``partition_counts`` turns a
partition's lines into ``(key, count)`` pairs (one pair per distinct service and
status, and per distinct URL), ``reduce_by_key(operator.add)`` sums them across
partitions, and ``summarize`` builds the report from the summed pairs.

``serial_report`` computes the same report in one process with a separately
written parser, so a bug in the map side cannot hide in the check.

Log format (see ``lepton_ai.data.synthetic``)::

    2026-11-18T11:06:40.003Z 10.10.37.90 search "GET /search/api/v2/session/160 HTTP/1.1" 200 643 6
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ERROR_STATUS_MIN = 500  # a request "failed" when the server answered 5xx
TOP_URLS = 10
_FIELDS = 9  # tokens of a well-formed line split on single spaces
STATUS_PREFIX = "S"  # key "S <service> <status>" -> requests with that status
URL_PREFIX = "U"  # key "U <path>" -> requests for that path
MALFORMED_KEY = "M"  # key "M" -> lines that did not parse


@dataclass(frozen=True, slots=True)
class ServiceStats:
    requests: int
    errors: int
    by_status: dict[int, int]

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True, slots=True)
class LogReport:
    """The job's answer. Equality is exact (integers only; rates derive from them)."""

    services: dict[str, ServiceStats]
    top_urls: list[tuple[str, int]]
    malformed: int = 0
    total_requests: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_requests", sum(s.requests for s in self.services.values()))

    def to_json(self) -> dict[str, Any]:
        return {
            "total_requests": self.total_requests,
            "malformed_lines": self.malformed,
            "services": {
                name: {
                    "requests": s.requests,
                    "errors": s.errors,
                    "error_rate": round(s.error_rate, 6),
                    "by_status": {str(code): n for code, n in sorted(s.by_status.items())},
                }
                for name, s in sorted(self.services.items())
            },
            "top_urls": [[url, n] for url, n in self.top_urls],
        }


def partition_counts(lines: Iterable[str]) -> list[tuple[str, int]]:
    """Map side (with combiner): ``(key, count)`` pairs for one partition's lines."""
    statuses: Counter[str] = Counter()
    urls: Counter[str] = Counter()
    malformed = 0
    for line in lines:
        parts = line.rstrip("\r\n").split(" ")
        if len(parts) != _FIELDS or not parts[3].startswith('"') or not parts[6].isdigit():
            if line.strip():
                malformed += 1
            continue
        statuses[f"{STATUS_PREFIX} {parts[2]} {parts[6]}"] += 1
        urls[f"{URL_PREFIX} {parts[4]}"] += 1
    out = list(statuses.items())
    out.extend(urls.items())
    if malformed:
        out.append((MALFORMED_KEY, malformed))
    return out


def add(a: int, b: int) -> int:
    """The reduce operator (a named function pickles by reference, cheaply)."""
    return a + b


def _top(urls: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(urls.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_URLS]


def _build(
    by_service: dict[str, dict[int, int]], urls: dict[str, int], malformed: int
) -> LogReport:
    services = {
        name: ServiceStats(
            requests=sum(codes.values()),
            errors=sum(n for code, n in codes.items() if code >= ERROR_STATUS_MIN),
            by_status=dict(sorted(codes.items())),
        )
        for name, codes in sorted(by_service.items())
    }
    return LogReport(services=services, top_urls=_top(urls), malformed=malformed)


def summarize(pairs: Iterable[tuple[str, int]]) -> LogReport:
    """Reduce side's last step: the report from summed ``(key, count)`` pairs (any order)."""
    by_service: dict[str, dict[int, int]] = {}
    urls: dict[str, int] = {}
    malformed = 0
    seen: set[str] = set()
    for key, count in pairs:
        if not isinstance(key, str) or isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"expected (str, int) pairs, got ({key!r}, {count!r})")
        if key in seen:
            # reduce_by_key must deliver each key once; a duplicate means the
            # output was not exactly-once, which is exactly what the check is for.
            raise ValueError(f"key {key!r} appears twice in the reduced output")
        seen.add(key)
        kind, _, rest = key.partition(" ")
        if kind == STATUS_PREFIX:
            service, _, code = rest.partition(" ")
            by_service.setdefault(service, {})[int(code)] = count
        elif kind == URL_PREFIX:
            urls[rest] = count
        elif kind == MALFORMED_KEY:
            malformed = count
        else:
            raise ValueError(f"unknown key {key!r}")
    return _build(by_service, urls, malformed)


def serial_report(paths: Sequence[Path | str]) -> LogReport:
    """The reference: the whole corpus in this process, parsed by quote positions."""
    by_service: dict[str, dict[int, int]] = {}
    urls: dict[str, int] = {}
    malformed = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for raw in f:
                line = raw.rstrip("\n")
                head, q1, rest = line.partition('"')
                request, q2, tail = rest.partition('"')
                head_fields = head.split()
                req_fields = request.split()
                tail_fields = tail.split()
                if not (q1 and q2) or len(head_fields) != 3 or len(req_fields) != 3:
                    malformed += bool(line.strip())
                    continue
                if len(tail_fields) != 3 or not tail_fields[0].isdigit():
                    malformed += 1
                    continue
                codes = by_service.setdefault(head_fields[2], {})
                status = int(tail_fields[0])
                codes[status] = codes.get(status, 0) + 1
                urls[req_fields[1]] = urls.get(req_fields[1], 0) + 1
    return _build(by_service, urls, malformed)
