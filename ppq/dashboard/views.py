"""The dashboard's pages, the JSON its live pages poll, and its actions.

Each endpoint is a method of :class:`Views`, wrapped by :meth:`Views.guard`, which checks
the Host header, the session (and sign-in, with a token), the CSRF token and read-only mode
of a POST, bounds the body, runs the reads of the master in a thread, and turns errors into
pages without tracebacks: no master answering is a 503 page with the "connection lost"
banner, a bad id or argument a 400 naming it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from ..errors import ConnectError, InvalidTaskError, PPQError
from ..task import check_task_id
from . import is_loopback
from .data import DEAD_PER_PAGE, TASKS_PER_PAGE, Source
from .security import COOKIE, MAX_BODY, SESSION_SECONDS, BodyTooLargeError, Sessions, parse_form, safe_next

log = logging.getLogger("ppq.dashboard")

TEMPLATES = Path(__file__).resolve().parent / "templates"
# Headers of every reply: no script, style or frame from anywhere else, no sniffing, no referrer.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# What an action did, as the page after it says it (?did=...).
DONE_MESSAGES = {
    "requeue": "Requeued {n} task(s).", "purge": "Purged {n} task(s).", "pause": "Schedule {name} paused.",
    "resume": "Schedule {name} resumed.", "run-now": "Schedule {name} pushed task {task}.",
}
# Seconds a live page's poll may be answered from the last read of the masters (shared by every open
# page): the page polls every second, so what is pushed shows within about 1.3 s at most.
POLL_FRESH = 0.3
# The states the tasks page lists, as the master's list_tasks names them, with what each is ordered by.
TASK_STATES = {"queued": "next to run first", "delayed": "soonest due first", "running": "soonest lease end first",
               "dead": "newest first"}
# Longest schedule name, task id or number a form or query may carry.
MAX_FIELD = 200
# Longest query string and path a request may have (bytes); longer is refused with 414 unread. uvicorn's
# h11 bound (16 KiB) holds only for a request that arrives in pieces: one sent whole passes it.
MAX_QUERY = 8 * 1024
MAX_PATH = 2 * 1024
# Most bytes of headers a request may have; more is refused with 431 (the same holds for h11's bound).
MAX_HEADERS = 16 * 1024

Handler = Callable[..., Awaitable[Response]]


class HTTPError(Exception):
    """An error shown as a page (or JSON) with its status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts)))


def _ago(ts: Any) -> str:
    if not isinstance(ts, (int, float)) or not ts:
        return "-"
    return _duration(max(0.0, time.time() - float(ts))) + " ago"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    s = float(seconds)
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60)}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60)}m"


def _size(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "-"  # pragma: no cover - the loop returns


def _pretty(value: Any) -> str:
    """A value as indented JSON (text; the template escapes it)."""
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):
        return repr(value)


def _int(value: str | None, name: str, default: int, low: int = 0, high: int = 10**9) -> int:
    if value is None or value == "":
        return default
    if len(value) > 12 or not value.lstrip("-").isdigit():
        raise HTTPError(400, f"{name} must be an integer, got {value[:40]!r}")
    number = int(value)
    if not low <= number <= high:
        raise HTTPError(400, f"{name} must be between {low} and {high}, got {number}")
    return number


class Views:
    """The endpoints, sharing one :class:`Source`, one :class:`Sessions` and the templates."""

    def __init__(self, source: Source, sessions: Sessions, read_only: bool, host: str) -> None:
        self.source = source
        self.sessions = sessions
        self.read_only = read_only
        self.loopback = is_loopback(host)
        self.host = host.strip().strip("[]").lower()
        self.templates = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                                            autoescape=jinja2.select_autoescape(["html"], default=True))
        self.templates.filters.update(when=_when, ago=_ago, duration=_duration, size=_size, pretty=_pretty)

    # -- the guard around every endpoint ---------------------------------------------------

    def _host_ok(self, request: Request) -> bool:
        """On a loopback bind, only loopback names in the Host header (no DNS rebinding)."""
        if not self.loopback:
            return True
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]").lower()
        return name in ("localhost", self.host) or is_loopback(name)

    async def _body(self, request: Request) -> dict[str, list[str]]:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            raise BodyTooLargeError
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise BodyTooLargeError
        return parse_form(body)

    def guard(self, handler: Handler, action: bool = False, public: bool = False, api: bool = False) -> Handler:
        """``handler(request, session, form)`` behind the checks; ``action``: a POST that changes
        something (refused in read-only mode); ``public``: the sign-in page; ``api``: errors as JSON."""

        async def endpoint(request: Request) -> Response:
            if not self._host_ok(request):
                return self._error(request, 400, "this dashboard answers to loopback host names only", api, None)
            if len(request.scope.get("query_string") or b"") > MAX_QUERY or len(request.url.path) > MAX_PATH:
                return self._error(request, 414, f"the address is too long (at most {MAX_PATH} bytes of path and "
                                                 f"{MAX_QUERY} of query)", api, None)
            if sum(len(k) + len(v) for k, v in request.scope.get("headers") or ()) > MAX_HEADERS:
                return self._error(request, 431, f"the request's headers take more than {MAX_HEADERS} bytes", api,
                                   None)
            session = self.sessions.read(request.cookies.get(COOKIE))
            new_cookie = None
            if session is None:
                new_cookie, session = self.sessions.make(signed_in=not self.sessions.token)
            try:
                if not public and not self.sessions.signed_in(session):
                    if request.method == "POST":
                        raise HTTPError(403, "sign in first")
                    if api:
                        raise HTTPError(401, "sign in first")
                    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    response: Response = RedirectResponse("/signin?" + urlencode({"next": target}), 303)
                else:
                    form: dict[str, list[str]] = {}
                    if request.method == "POST":
                        form = await self._body(request)
                        if not self.sessions.csrf_ok(session, (form.get("csrf") or [""])[0]):
                            raise HTTPError(403, "the form's CSRF token is missing or wrong: reload the page")
                        if action and self.read_only:
                            raise HTTPError(403, "this dashboard is read-only")
                    self.source.watched()
                    response = await handler(request, session, form)
            except BodyTooLargeError:
                response = self._error(request, 413, f"the request is larger than {MAX_BODY} bytes", api, session)
            except HTTPError as exc:
                response = self._error(request, exc.status, str(exc), api, session)
            except ConnectError as exc:
                response = self._error(request, 503, f"no master answers: {exc}", api, session, lost=True)
            except InvalidTaskError as exc:
                response = self._error(request, 400, str(exc), api, session)
            except PPQError as exc:
                response = self._error(request, 502, f"{type(exc).__name__}: {exc}", api, session)
            except Exception:
                log.exception("dashboard: %s %s failed", request.method, request.url.path)
                response = self._error(request, 500, "internal error (the dashboard's log has the details)", api,
                                       session)
            if new_cookie is not None:
                response.set_cookie(COOKIE, new_cookie, max_age=SESSION_SECONDS, httponly=True, samesite="strict",
                                    secure=request.url.scheme == "https", path="/")
            response.headers.update(SECURITY_HEADERS)
            return response

        return endpoint

    def _error(self, request: Request, status: int, message: str, api: bool, session: dict[str, Any] | None,
               lost: bool = False) -> Response:
        if api:
            return JSONResponse({"ok": False, "error": message}, status)
        return self.render("error.html", request, session, status=status, message=message, lost=lost)

    def render(self, name: str, request: Request, session: dict[str, Any] | None, status: int = 200,
               **values: Any) -> HTMLResponse:
        values.setdefault("lost", False)
        values.setdefault("message", "")
        context = {
            "path": request.url.path, "read_only": self.read_only,
            "csrf": self.sessions.csrf(session) if session else "",
            "signed_in": bool(self.sessions.token) and self.sessions.signed_in(session),
            # Before sign-in a page shows nothing of the system, not even where its masters are.
            "authed": self.sessions.signed_in(session),
            "masters": self.source.masters, **values,
        }
        return HTMLResponse(self.templates.get_template(name).render(context), status)

    def fragment(self, name: str, **values: Any) -> str:
        return self.templates.get_template(name).render({"read_only": self.read_only, **values})

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A blocking read of the masters, off the event loop."""
        return await run_in_threadpool(fn, *args)

    # -- sign-in ---------------------------------------------------------------------------

    async def signin(self, request: Request, session: dict[str, Any], form: dict[str, list[str]]) -> Response:
        target = safe_next(request.query_params.get("next") or (form.get("next") or ["/"])[0])
        if not self.sessions.token:
            return RedirectResponse(target, 303)
        if request.method == "GET":
            return self.render("signin.html", request, session, next=target, refused=False)
        address = request.client.host if request.client else "?"
        if self.sessions.throttled(address):
            raise HTTPError(429, "too many wrong tokens from this address: try again in a minute")
        if not self.sessions.check_token((form.get("token") or [""])[0]):
            self.sessions.failed(address)
            log.warning("dashboard: a wrong sign-in token from %s", address)
            return self.render("signin.html", request, session, status=403, next=target, refused=True)
        cookie, _ = self.sessions.make(signed_in=True)  # a new session id on sign-in
        response = RedirectResponse(target, 303)
        response.set_cookie(COOKIE, cookie, max_age=SESSION_SECONDS, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        return response

    async def signout(self, request: Request, session: dict[str, Any], form: dict[str, list[str]]) -> Response:
        self.sessions.sign_out(session)
        response = RedirectResponse("/signin" if self.sessions.token else "/", 303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- overview --------------------------------------------------------------------------

    def _overview(self, fresh: float = 0.0) -> dict[str, Any]:
        """The last ``server_info``, read again if older than ``fresh`` seconds (0: a page, read now)."""
        latest = self.source.latest(fresh)
        queues = [dict(entry, queue_index=qi) for qi, entry in sorted(latest["queues"].items())]
        return {"ok": latest["ok"], "error": latest["error"], "at": latest["at"], "queues": queues}

    async def overview(self, request: Request, session: dict[str, Any], form: dict[str, list[str]]) -> Response:
        data = await self.read(self._overview)
        return self.render("overview.html", request, session, lost=not data["ok"], data=data,
                           queues_html=self.fragment("_queues.html", data=data))

    async def api_overview(self, request: Request, session: dict[str, Any], form: dict[str, list[str]]) -> Response:
        data = await self.read(self._overview, POLL_FRESH)
        series = await self.read(self.source.series)
        return JSONResponse({"ok": data["ok"], "error": data["error"], "at": data["at"], "series": series,
                             "html": self.fragment("_queues.html", data=data)}, 200)

    # -- workers ---------------------------------------------------------------------------

    async def workers(self, request: Request, session: dict[str, Any], form: dict[str, list[str]]) -> Response:
        page = _int(request.query_params.get("page"), "page", 1, 1)
        data = await self.read(self.source.workers, page)
        return self.render("workers.html", request, session, lost=not data["ok"], data=data,
                           workers_html=self.fragment("_workers.html", data=data, now=time.time()))

    async def api_workers(self, request: Request, session: dict[str, Any], form: dict[str, list[str]]) -> Response:
        page = _int(request.query_params.get("page"), "page", 1, 1)
        data = await self.read(self.source.workers, page, POLL_FRESH)
        return JSONResponse({"ok": data["ok"], "error": data["error"],
                             "html": self.fragment("_workers.html", data=data, now=time.time())})

    # -- tasks -----------------------------------------------------------------------------

    def _queue_index(self, value: str | None) -> int:
        return _int(value, "queue_index", 0, 0, 10**6)

    async def tasks(self, request: Request, session: dict[str, Any], form: dict[str, list[str]]) -> Response:
        params = request.query_params
        task_id = (params.get("id") or "").strip()
        qi = self._queue_index(params.get("q"))
        if task_id:
            check_task_id(task_id[:MAX_FIELD], "id")
            return RedirectResponse(f"/tasks/{qi}/{quote(task_id, safe='')}", 303)
        state = params.get("state") or "queued"
        if state not in TASK_STATES:
            raise HTTPError(400, f"state must be one of {', '.join(TASK_STATES)}, got {state[:40]!r}")
        offset = _int(params.get("offset"), "offset", 0, 0, 10**12)
        func = (params.get("func") or "").strip()
        if len(func) > MAX_FIELD:
            raise HTTPError(400, f"func must be at most {MAX_FIELD} characters")
        data = await self.read(self._overview)
        listed = await self.read(self.source.list_tasks, state, qi, offset, func or None)
        entry: dict[str, Any] = next((q for q in data["queues"] if q["queue_index"] == qi), {})
        counts = {name: entry.get(name) for name in TASK_STATES}
        counts[state] = listed["total"]  # as the page read it

        def link(**change: Any) -> str:
            values = {"q": qi, "state": state, "func": func, "offset": offset, **change}
            return "/tasks?" + urlencode({k: v for k, v in values.items() if v not in ("", None, 0) or k == "q"})

        return self.render("tasks.html", request, session, lost=not data["ok"], state=state, qi=qi, func=func,
                           offset=offset, listed=listed, counts=counts, states=TASK_STATES, link=link,
                           per_page=TASKS_PER_PAGE, queue_indexes=[q["queue_index"] for q in data["queues"]] or [qi])

    async def task(self, request: Request, session: dict[str, Any], form: dict[str, list[str]]) -> Response:
        qi = self._queue_index(request.path_params["qi"])
        task_id = check_task_id(request.path_params["task_id"], "id")
        info = await self.read(self.source.task, task_id, qi)
        if info is None:
            raise HTTPError(404, f"task {task_id} is unknown in queue_index {qi} (never pushed, or its record "
                                 f"expired)")
        info.pop("result_pickled", None)
        return self.render("task.html", request, session, task=info, qi=qi)

    # -- the dead list ---------------------------------------------------------------------

    async def dead(self, request: Request, session: dict[str, Any], form: dict[str, list[str]]) -> Response:
        qi = self._queue_index(request.path_params.get("qi"))
        page = _int(request.query_params.get("page"), "page", 1, 1, 10**6)
        tasks = await self.read(self.source.dead, qi, page)
        overview = await self.read(self._overview)
        entry: dict[str, Any] = next((q for q in overview["queues"] if q["queue_index"] == qi), {})
        total = int(entry.get("dead", 0) or 0)
        return self.render("dead.html", request, session, lost=not overview["ok"], tasks=tasks, qi=qi, page=page,
                           pages=max(1, -(-total // DEAD_PER_PAGE)), total=total, done=self._done(request),
                           queue_indexes=[q["queue_index"] for q in overview["queues"]] or [qi])

    async def dead_action(self, request: Request, session: dict[str, Any], form: dict[str, list[str]]) -> Response:
        qi = self._queue_index(request.path_params["qi"])
        action = (form.get("action") or [""])[0]
        if action not in ("requeue", "purge"):
            raise HTTPError(400, "action must be requeue or purge")
        every = (form.get("all") or [""])[0] == "1"
        ids = [check_task_id(t, "id") for t in form.get("id", [])]
        if not every and not ids:
            raise HTTPError(400, "choose the tasks first (or all of them)")
        if (form.get("confirm") or [""])[0] != "1":
            overview = await self.read(self._overview)
            entry: dict[str, Any] = next((q for q in overview["queues"] if q["queue_index"] == qi), {})
            return self.render("confirm.html", request, session, action=action, qi=qi, ids=ids, every=every,
                               count=int(entry.get("dead", 0) or 0) if every else len(ids))
        target = None if every else ids
        if action == "requeue":
            n = len(await self.read(self.source.client.call, "requeue_dead", target, qi))
        else:
            n = int(await self.read(self.source.client.call, "purge_dead", target, qi))
        log.info("dashboard: %s of %s dead task(s) in queue_index %s: %d", action, "all" if every else len(ids),
                 qi, n)
        return RedirectResponse(f"/dead/{qi}?" + urlencode({"did": action, "n": n}), 303)

    def _done(self, request: Request) -> str:
        """What the action before this page did (?did=...), in words."""
        did = request.query_params.get("did", "")
        if did not in DONE_MESSAGES:
            return ""
        values = {
            "n": str(_int(request.query_params.get("n"), "n", 0)),
            "name": request.query_params.get("name", "")[:MAX_FIELD],
            "task": request.query_params.get("task", "")[:MAX_FIELD],
        }
        return DONE_MESSAGES[did].format(**values)

    # -- schedules and limits ---------------------------------------------------------------

    async def schedules(self, request: Request, session: dict[str, Any], form: dict[str, list[str]]) -> Response:
        page = _int(request.query_params.get("page"), "page", 1, 1, 10**6)
        entries = await self.read(self.source.client.schedules)
        per_page = 50
        pages = max(1, -(-len(entries) // per_page))
        shown = entries[(page - 1) * per_page:page * per_page]
        ran = request.query_params.get("task", "")
        return self.render("schedules.html", request, session, schedules=shown, page=page, pages=pages,
                           total=len(entries), done=self._done(request), ran=ran,
                           ran_q=self._queue_index(request.query_params.get("q")))

    async def schedule_action(self, request: Request, session: dict[str, Any],
                              form: dict[str, list[str]]) -> Response:
        name = (form.get("name") or [""])[0][:MAX_FIELD]
        qi = self._queue_index((form.get("queue_index") or [""])[0])
        action = (form.get("action") or [""])[0]
        client = self.source.client
        extra: dict[str, Any] = {}
        if action == "pause":
            await self.read(client.pause_schedule, name, qi)
        elif action == "resume":
            await self.read(client.resume_schedule, name, qi)
        elif action == "run-now":
            extra = {"task": await self.read(client.run_schedule_now, name, qi), "q": qi}
        else:
            raise HTTPError(400, "action must be pause, resume or run-now")
        log.info("dashboard: schedule %s (queue_index %s): %s", name, qi, action)
        return RedirectResponse("/schedules?" + urlencode({"did": action, "name": name, **extra}), 303)

    async def limits(self, request: Request, session: dict[str, Any], form: dict[str, list[str]]) -> Response:
        limits = await self.read(self.source.client.limits)
        rows = [dict(e, queue_index=qi) for qi, entries in sorted(limits.items()) for e in entries]
        return self.render("limits.html", request, session, limits=rows)

    # -- workflows -------------------------------------------------------------------------

    async def workflows(self, request: Request, session: dict[str, Any], form: dict[str, list[str]]) -> Response:
        task_id = (request.query_params.get("id") or "").strip()
        qi = self._queue_index(request.query_params.get("q"))
        tree = None
        if task_id:
            check_task_id(task_id[:MAX_FIELD], "id")
            tree = await self.read(self.source.workflow, task_id, qi)
            if tree is None:
                raise HTTPError(404, f"task {task_id} is unknown in queue_index {qi}")
        return self.render("workflows.html", request, session, tree=tree, qi=qi, task_id=task_id)
