"""The dashboard's guards: a signed session cookie, the sign-in token check, CSRF tokens, and
bounded request bodies.

Every visitor gets a session (a random id and when it was made, HMAC-signed with a key made
when the dashboard starts, in an HttpOnly, SameSite=Strict cookie). With a sign-in token
configured, a session is only *signed in* after the right token was given on the sign-in page
(compared in constant time). Every form that changes something carries the session's CSRF
token, an HMAC of its id; a POST without the right one is refused with 403.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import deque
from typing import Any
from urllib.parse import parse_qs

# The session cookie's name.
COOKIE = "ppq_dashboard"
# Seconds a session lasts.
SESSION_SECONDS = 12 * 3600
# Largest request body read (a form), in bytes; larger is refused with 413.
MAX_BODY = 64 * 1024
# Most fields one form may hold (task ids of a bulk requeue among them).
MAX_FIELDS = 1100
# Wrong sign-in tokens one address may send per SIGN_IN_WINDOW seconds; more are refused unread.
SIGN_IN_FAILURES = 10
SIGN_IN_WINDOW = 60.0
# Most signed-out sessions remembered (until they would have expired anyway); past it, the oldest go.
MAX_SIGNED_OUT = 10_000


def safe_next(target: str) -> str:
    r"""Where sign-in may send the browser after: a path of this site, else "/". Refused: anything
    not starting with one "/" ("//host" and "/\host" lead elsewhere), and any control character or
    space (browsers drop tabs and newlines from a URL, so "/	/host" would become "//host")."""
    if (not target.startswith("/") or target.startswith("//") or len(target) > 2000
            or any(c == "\\" or ord(c) <= 0x20 or ord(c) == 0x7f for c in target)):
        return "/"
    return target


class BodyTooLargeError(Exception):
    """A request body over MAX_BODY."""


class Sessions:
    """Makes and checks session cookies and CSRF tokens with a key of this process."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self._key = secrets.token_bytes(32)
        self._failures: dict[str, deque[float]] = {}
        self._failures_lock = threading.Lock()
        # Session id -> when it was made, for the sessions signed out: their cookies are refused.
        self._signed_out: dict[str, int] = {}

    def throttled(self, address: str) -> bool:
        """Whether ``address`` sent SIGN_IN_FAILURES wrong tokens in the last SIGN_IN_WINDOW seconds."""
        now = time.monotonic()
        with self._failures_lock:
            times = self._failures.get(address)
            while times and times[0] < now - SIGN_IN_WINDOW:
                times.popleft()
            return times is not None and len(times) >= SIGN_IN_FAILURES

    def failed(self, address: str) -> None:
        """Count a wrong token from ``address`` (the table is bounded: it is cleared when it is large)."""
        with self._failures_lock:
            if len(self._failures) > 10_000:
                self._failures.clear()
            self._failures.setdefault(address, deque(maxlen=SIGN_IN_FAILURES)).append(time.monotonic())

    def _sign(self, data: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self._key, data, hashlib.sha256).digest()).decode().rstrip("=")

    def make(self, signed_in: bool) -> tuple[str, dict[str, Any]]:
        """A new session, as its cookie value and its content."""
        session = {"id": secrets.token_urlsafe(16), "at": int(time.time()), "in": bool(signed_in)}
        data = base64.urlsafe_b64encode(json.dumps(session, separators=(",", ":")).encode()).decode().rstrip("=")
        return f"{data}.{self._sign(data.encode())}", session

    def read(self, cookie: str | None) -> dict[str, Any] | None:
        """The session a cookie holds, or None if it is missing, forged or expired."""
        if not cookie or len(cookie) > 1024 or "." not in cookie:
            return None
        data, _, signature = cookie.rpartition(".")
        if not hmac.compare_digest(signature, self._sign(data.encode())):
            return None
        try:
            session = json.loads(base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)))
        except ValueError:
            return None
        if not isinstance(session, dict) or not isinstance(session.get("at"), int):
            return None
        if time.time() - session["at"] > SESSION_SECONDS or session.get("id") in self._signed_out:
            return None
        return session

    def sign_out(self, session: dict[str, Any]) -> None:
        """Refuse this session's cookie from now on (a copy of it kept elsewhere signs in no one)."""
        with self._failures_lock:
            now = time.time()
            for sid, at in list(self._signed_out.items()):
                if now - at > SESSION_SECONDS:
                    del self._signed_out[sid]
            while len(self._signed_out) >= MAX_SIGNED_OUT:
                del self._signed_out[next(iter(self._signed_out))]
            self._signed_out[str(session.get("id"))] = int(session.get("at") or now)

    def signed_in(self, session: dict[str, Any] | None) -> bool:
        """Whether the session may see the pages: always without a token."""
        if not self.token:
            return session is not None
        return session is not None and session.get("in") is True

    def check_token(self, given: str) -> bool:
        """Whether ``given`` is the sign-in token, compared in constant time."""
        if not self.token:
            return True
        return hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode("utf-8"))

    def csrf(self, session: dict[str, Any]) -> str:
        """The CSRF token of a session."""
        return self._sign(b"csrf:" + str(session["id"]).encode())

    def csrf_ok(self, session: dict[str, Any] | None, given: str) -> bool:
        return session is not None and hmac.compare_digest(given.encode("utf-8", "replace"),
                                                           self.csrf(session).encode())


def parse_form(body: bytes) -> dict[str, list[str]]:
    """An ``application/x-www-form-urlencoded`` body, bounded in fields."""
    try:
        return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError):
        return {}
