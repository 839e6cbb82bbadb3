"""The console's sessions: who signed in, held on the server (a random id in a cookie
names one), with an idle and an absolute expiry, a CSRF token each, and the cookie's
attributes (HttpOnly, SameSite=Strict, Secure over https). Nothing here knows HTTP routing."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

COOKIE = "codecage_console"
SECURE_COOKIE = "__Host-codecage_console"  # the browser then insists on Secure, Path=/, no Domain
MAX_SESSIONS = 10_000  # sessions held at once: the ended, then the oldest go first beyond this
MAX_PER_KEY = 32  # one key's sessions at once: its own oldest go first beyond this


@dataclass
class Session:
    id: str
    tenant: str  # the key's tenant (an operator key's too: its name in decisions)
    role: str  # "operator", "approver" or "client"
    key_id: str  # the prefix of the key's hash the audit log records
    name: str  # who signed in, as they said (defaults to the key's tenant)
    csrf: str
    created_at: float
    seen_at: float
    flashes: list[str] = field(default_factory=list)

    def identity(self) -> tuple[str, str, str]:
        return (self.tenant, self.role, self.key_id)


class Sessions:
    """Signed-in sessions in memory (a restart signs everyone out). `clock` is for tests."""

    def __init__(
        self, idle_s: float, max_age_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.idle_s, self.max_age_s, self.clock = idle_s, max_age_s, clock
        self._lock = threading.Lock()
        self._by_id: dict[str, Session] = {}

    def create(self, tenant: str, role: str, key_id: str, name: str) -> Session:
        """A new session, with a fresh id and CSRF token (never one from before sign-in)."""
        now = self.clock()
        session = Session(
            secrets.token_urlsafe(32), tenant, role, key_id, name, secrets.token_urlsafe(32),
            now, now,
        )  # fmt: skip
        with self._lock:
            self._by_id[session.id] = session
            # One key signing in again and again pushes out its own sessions only, never
            # another key's (an operator's): the table is bounded per key and in all.
            mine = [s.id for s in self._by_id.values() if s.key_id == key_id]
            for old in mine[: max(0, len(mine) - MAX_PER_KEY)]:
                del self._by_id[old]
            if len(self._by_id) > MAX_SESSIONS:
                for old in [s.id for s in self._by_id.values() if self._ended(s, now)]:
                    del self._by_id[old]
            while len(self._by_id) > MAX_SESSIONS:
                del self._by_id[next(iter(self._by_id))]
        return session

    def _ended(self, session: Session, now: float) -> bool:
        return now - session.seen_at > self.idle_s or now - session.created_at > self.max_age_s

    def get(self, session_id: str | None) -> tuple[Session | None, str]:
        """(the live session, "") or (None, why: "none", "unknown" or "expired"). A live
        session's idle clock restarts."""
        if not session_id:
            return None, "none"
        now = self.clock()
        with self._lock:
            session = self._by_id.get(session_id)
            if session is None:
                return None, "unknown"
            if self._ended(session, now):
                del self._by_id[session_id]
                return None, "expired"
            session.seen_at = now
        return session, ""

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._by_id.pop(session_id, None)


def csrf_ok(session: Session, given: str | None) -> bool:
    """The form's (or header's) token is the session's own, compared in constant time."""
    return bool(given) and hmac.compare_digest(session.csrf.encode(), (given or "").encode())


def is_https(scheme: str, headers: dict[bytes, bytes], trust_forwarded_proto: bool) -> bool:
    """Whether the browser talks https to us: directly, or through a trusted TLS proxy that
    says so in X-Forwarded-Proto (believed only when the config trusts it)."""
    if scheme == "https":
        return True
    if not trust_forwarded_proto:
        return False
    forwarded = headers.get(b"x-forwarded-proto", b"").decode("latin-1")
    return forwarded.split(",")[0].strip().lower() == "https"


def cookie_header(value: str, secure: bool, max_age_s: float | None) -> str:
    """A Set-Cookie value for the session cookie (an empty value with max_age 0 clears it)."""
    name = SECURE_COOKIE if secure else COOKIE
    parts = [f"{name}={value}", "HttpOnly", "SameSite=Strict", "Path=/"]
    if secure:
        parts.append("Secure")
    if max_age_s is not None:
        parts.append(f"Max-Age={int(max_age_s)}")
    return "; ".join(parts)


def session_id_of(cookies: dict[str, str], secure: bool = False) -> str | None:
    """The session id from a request's cookies: over https the __Host- one only (a plain
    cookie may have been set by anyone who can write cookies for the host: another port,
    a sibling domain, a plain-http answer), else the plain one."""
    if secure:
        return cookies.get(SECURE_COOKIE)
    return cookies.get(SECURE_COOKIE) or cookies.get(COOKIE)
