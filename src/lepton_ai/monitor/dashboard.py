"""The live dashboard: a Starlette app over a ``DashboardSource``.

    app = dashboard_app(ClusterSource(cluster), cluster.token)   # standalone
    routes = dashboard_routes(source, token)                      # to mount elsewhere

Pages are plain HTML with a small vanilla script (``static/``), nothing from the
internet. The page polls ``api/snapshot`` once a second while it is visible.

Every data route needs a session cookie from the login form (``dashboard_auth``);
without one it answers 401 (JSON), and the page redirects to the form.

All viewers share one cache: at most one snapshot is fetched per
``SNAPSHOT_MAX_AGE_S``, whatever the number of open tabs, on a bounded number
of worker threads (the cluster client is synchronous). While a fetch is slow
(no leader for a moment) viewers get the last snapshot, marked with its age,
instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from lepton_ai.monitor.dashboard_auth import (
    SESSION_MAX_AGE_S,
    LoginLimiter,
    cookie_name,
    make_session,
    now_s,
    session_valid,
    token_matches,
)
from lepton_ai.monitor.dashboard_source import DashboardSource

STATIC_DIR = Path(__file__).parent / "static"
SNAPSHOT_MAX_AGE_S = 0.5  # one snapshot serves every viewer for this long
FETCH_WAIT_S = 2.0  # a viewer waits this long for a fresh snapshot, then gets the last one
FETCHES_MAX = 2  # cluster calls in flight at once (worker threads), all viewers together
TASK_JOBS_CACHED_MAX = 16  # jobs whose task timelines are cached
LOGIN_BODY_BYTES_MAX = 4096  # a login form is one short field
JOB_ID_CHARS_MAX = 64
# The pages load only their own files; nothing inline, nothing from elsewhere.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


class SourceUnavailable(Exception):
    """No snapshot yet and none arrived within ``FETCH_WAIT_S``."""


@dataclass
class _Entry:
    body: bytes | None = None  # the JSON answer, encoded once for every viewer
    at: float = 0.0  # monotonic time it was fetched
    task: asyncio.Task[None] | None = None


@dataclass
class SnapshotCache:
    """Fetches from the source on worker threads, at most ``fetches_max`` at once,
    each answer kept ``max_age_s`` and shared; one fetch per key at a time."""

    source: DashboardSource
    max_age_s: float = SNAPSHOT_MAX_AGE_S
    wait_s: float = FETCH_WAIT_S
    fetches_max: int = FETCHES_MAX
    keys_max: int = TASK_JOBS_CACHED_MAX + 1
    _entries: OrderedDict[str, _Entry] = field(init=False, default_factory=OrderedDict)
    _limit: asyncio.Semaphore | None = field(init=False, default=None)

    async def snapshot(self) -> bytes:
        return await self._get("snapshot", self.source.snapshot)

    async def job_tasks(self, job_id: str) -> bytes:
        def fetch() -> dict[str, Any]:
            return {"job_id": job_id, "tasks": self.source.job_tasks(job_id)}

        return await self._get("tasks:" + job_id, fetch)

    async def _get(self, key: str, fetch: Callable[[], Any]) -> bytes:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
            self._evict()
        self._entries.move_to_end(key)
        if entry.body is not None and time.monotonic() - entry.at < self.max_age_s:
            return entry.body
        if entry.task is None:
            entry.task = asyncio.create_task(self._fetch(entry, fetch))
            entry.task.add_done_callback(_consume)
        with contextlib.suppress(TimeoutError):
            # shield: a viewer that stops waiting does not cancel the shared fetch.
            await asyncio.wait_for(asyncio.shield(entry.task), self.wait_s)
        if entry.body is None:
            raise SourceUnavailable(f"no answer from the cluster within {self.wait_s:g} s")
        return entry.body

    async def _fetch(self, entry: _Entry, fetch: Callable[[], Any]) -> None:
        if self._limit is None:
            self._limit = asyncio.Semaphore(self.fetches_max)  # on the serving loop
        try:
            async with self._limit:
                entry.body = await asyncio.to_thread(_encode, fetch)
                entry.at = time.monotonic()
        finally:
            entry.task = None

    def _evict(self) -> None:
        """Forget the least recently asked keys beyond the bound (never a fetching one)."""
        for key in list(self._entries):
            if len(self._entries) <= self.keys_max:
                return
            if self._entries[key].task is None:
                del self._entries[key]

    async def aclose(self) -> None:
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.source.close()


def _encode(fetch: Callable[[], Any]) -> bytes:
    return json.dumps(fetch(), separators=(",", ":")).encode()


def _consume(task: asyncio.Task[None]) -> None:
    """Retrieve a fetch's exception when every viewer stopped waiting for it: the
    next viewer starts a new fetch, and asyncio must not warn it went unseen."""
    if not task.cancelled():
        task.exception()


class Dashboard:
    """The routes and their shared state (cache, login limiter, token)."""

    def __init__(self, source: DashboardSource, token: str) -> None:
        if not token:
            raise ValueError("the dashboard needs the cluster token")
        self.token = token
        self.cache = SnapshotCache(source)
        self.limiter = LoginLimiter()
        self.cookie = cookie_name(token)
        self.index_html = (STATIC_DIR / "index.html").read_text()
        self.login_html = (STATIC_DIR / "login.html").read_text()

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.index, methods=["GET"], name="dashboard_index"),
            Route("/login", self.login_form, methods=["GET"], name="dashboard_login"),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"], name="dashboard_logout"),
            Route("/api/snapshot", self.snapshot, methods=["GET"]),
            Route("/api/jobs/{job_id}/tasks", self.job_tasks, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="dashboard_static"),
        ]

    # -- auth --------------------------------------------------------------------
    def authed(self, request: Request) -> bool:
        return session_valid(self.token, request.cookies.get(self.cookie), now_s())

    async def login_form(self, request: Request) -> Response:
        return self._login_page("", 200)

    async def login(self, request: Request) -> Response:
        client = request.client.host if request.client else "unknown"
        now = now_s()
        if not self.limiter.allowed(client, now):
            return self._login_page("Too many failed logins: wait a minute and try again.", 429)
        offered = await _form_token(request)
        if offered is None:
            return self._login_page("Send the form: a token field, url-encoded.", 400)
        if not token_matches(self.token, offered):
            self.limiter.failed(client, now)
            return self._login_page("Wrong token.", 401)
        response = RedirectResponse(request.url_for("dashboard_index"), 303)
        response.set_cookie(
            self.cookie,
            make_session(self.token, now),
            max_age=SESSION_MAX_AGE_S,
            path=_cookie_path(request),
            httponly=True,  # the page's script never needs it: keep it from any script
            samesite="strict",  # no other site can make the browser send it
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse(request.url_for("dashboard_login"), 303)
        response.delete_cookie(self.cookie, path=_cookie_path(request))
        return response

    def _login_page(self, message: str, status: int) -> Response:
        note = f'<p class="error" id="login-error">{html.escape(message)}</p>' if message else ""
        page = self.login_html.replace("<!--MESSAGE-->", note)
        return HTMLResponse(page, status, headers=SECURITY_HEADERS)

    # -- pages and data ----------------------------------------------------------
    async def index(self, request: Request) -> Response:
        if not self.authed(request):
            return RedirectResponse(request.url_for("dashboard_login"), 303)
        return HTMLResponse(self.index_html, headers=SECURITY_HEADERS)

    async def snapshot(self, request: Request) -> Response:
        if not self.authed(request):
            return _unauthorized()
        return await self._answer(self.cache.snapshot())

    async def job_tasks(self, request: Request) -> Response:
        if not self.authed(request):
            return _unauthorized()
        job_id = str(request.path_params["job_id"])
        if len(job_id) > JOB_ID_CHARS_MAX or not job_id.isalnum():
            return JSONResponse({"error": "bad job id"}, 400, headers=SECURITY_HEADERS)
        return await self._answer(self.cache.job_tasks(job_id))

    async def _answer(self, body: Any) -> Response:
        try:
            data: bytes = await body
        except SourceUnavailable as exc:
            return JSONResponse({"error": str(exc)}, 503, headers=SECURITY_HEADERS)
        return Response(data, 200, media_type="application/json", headers=SECURITY_HEADERS)


def _unauthorized() -> Response:
    return JSONResponse({"error": "log in first"}, 401, headers=SECURITY_HEADERS)


def _cookie_path(request: Request) -> str:
    """The mount point: the session goes to the dashboard's routes only."""
    root = str(request.scope.get("root_path", "")).rstrip("/")
    return root + "/"


async def _form_token(request: Request) -> str | None:
    """The ``token`` field of a url-encoded form, read up to a bound."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return None
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > LOGIN_BODY_BYTES_MAX:
            return None
    fields = urllib.parse.parse_qs(body.decode("utf-8", "replace"), max_num_fields=4)
    values = fields.get("token", [])
    return values[0] if len(values) == 1 else None


def dashboard_routes(source: DashboardSource, token: str) -> list[BaseRoute]:
    """The dashboard's routes, to mount in another Starlette app (e.g. under
    ``Mount("/dashboard", routes=...)``); every link in the pages is relative."""
    return Dashboard(source, token).routes()


def dashboard_app(source: DashboardSource, token: str) -> Starlette:
    """A standalone app serving only the dashboard."""
    dashboard = Dashboard(source, token)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await dashboard.cache.aclose()

    return Starlette(routes=dashboard.routes(), lifespan=lifespan)
