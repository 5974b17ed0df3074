"""The dashboard's login: the cluster token once, then an HMAC-derived session cookie.

The browser never holds the token itself: a correct login sets a cookie
``<expiry>.<hmac(token, "dashboard-session|<expiry>")>``. Any process that knows
the token (every coordinator) can check it without shared session state, so a
dashboard served by another coordinator after a failover accepts the same
cookie; a stolen cookie stops working at its expiry and says nothing about the
token. Failed logins are rate limited per client address and in total.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

SESSION_MAX_AGE_S = 12 * 3600  # a session lasts a working day, then log in again
LOGIN_FAILURES_MAX = 10  # failed logins one client address may make per window
LOGIN_FAILURES_TOTAL_MAX = 100  # failed logins from all addresses per window
LOGIN_WINDOW_S = 60.0
LOGIN_CLIENTS_MAX = 1024  # addresses remembered; the oldest is forgotten beyond this
_SESSION_CONTEXT = b"lepton-dashboard-session-v1|"
_NAME_CONTEXT = b"lepton-dashboard-cookie-name-v1"


def _mac(token: str, message: bytes) -> str:
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def cookie_name(token: str) -> str:
    """A cookie name of this cluster's own: browsers share cookies across the ports
    of one host, so two clusters on one machine must not overwrite each other's
    session. Derived from the token by HMAC, so the name reveals nothing of it."""
    return "lepton_session_" + _mac(token, _NAME_CONTEXT)[:12]


def token_matches(token: str, offered: str) -> bool:
    """Constant-time comparison; hashing first hides the token's length too."""
    want = hashlib.sha256(token.encode()).digest()
    got = hashlib.sha256(offered.encode(errors="replace")).digest()
    return hmac.compare_digest(want, got)


def make_session(token: str, now: float, max_age_s: float = SESSION_MAX_AGE_S) -> str:
    expiry = int(now + max_age_s)
    return f"{expiry}.{_mac(token, _SESSION_CONTEXT + str(expiry).encode())}"


def session_valid(token: str, value: str | None, now: float) -> bool:
    """True for a cookie ``make_session`` made with this token that has not expired."""
    if not value or value.count(".") != 1:
        return False
    expiry_text, mac = value.split(".")
    if not expiry_text.isdigit() or len(expiry_text) > 12:
        return False
    want = _mac(token, _SESSION_CONTEXT + expiry_text.encode())
    if not hmac.compare_digest(want.encode(), mac.encode(errors="replace")):
        return False
    return int(expiry_text) > now


@dataclass
class LoginLimiter:
    """A sliding window of failed logins, per client address and in total.

    While a client (or everyone together) is over its bound every attempt is
    refused, the right token too: otherwise a guesser would still learn which of
    its guesses was right."""

    failures_max: int = LOGIN_FAILURES_MAX
    total_max: int = LOGIN_FAILURES_TOTAL_MAX
    window_s: float = LOGIN_WINDOW_S
    clients_max: int = LOGIN_CLIENTS_MAX

    def __post_init__(self) -> None:
        self._by_client: OrderedDict[str, deque[float]] = OrderedDict()
        self._all: deque[float] = deque()

    def _trim(self, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window_s:
            times.popleft()

    def allowed(self, client: str, now: float) -> bool:
        self._trim(self._all, now)
        if len(self._all) >= self.total_max:
            return False
        times = self._by_client.get(client)
        if times is None:
            return True
        self._trim(times, now)
        if not times:
            del self._by_client[client]
            return True
        return len(times) < self.failures_max

    def failed(self, client: str, now: float) -> None:
        self._all.append(now)
        del_extra = len(self._all) - self.total_max
        for _ in range(max(0, del_extra)):
            self._all.popleft()  # only the last total_max matter for the bound
        times = self._by_client.pop(client, None) or deque(maxlen=self.failures_max)
        times.append(now)
        self._by_client[client] = times  # most recent last: eviction drops the oldest
        while len(self._by_client) > self.clients_max:
            self._by_client.popitem(last=False)


def now_s() -> float:
    """Wall-clock seconds: cookie expiries must mean the same in every process."""
    return time.time()
