"""The operator's console at /console (docs/console.md): server-rendered pages over the
same Manager and audit log as the API, signed in with an API key, held in a cookie.

`install(app, ...)` (called by create_app) puts `Dispatch` outermost: a request for
/console or under it goes to the console's own app (no OpenAPI document of its own, none
of its routes in the API's), behind `Front`: the API's admission (each tenant's requests
in flight capped, slow bodies cut off) with the session cookie as the credential, and a
small body limit. Everything else goes on to the API unchanged.

- sessions.py: sessions, CSRF tokens, the cookie's attributes
- safety.py: the Content-Security-Policy and headers, image checks, findings on lines
- charts.py: the /metrics data sampled and drawn as SVG
- pages.py: the routes and what each page shows
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..app import Admission, BodyLimit
from .safety import HEADERS
from .sessions import Sessions, is_https, session_id_of

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..config import ServerConfig

PREFIX = "/console"
FORM_BYTES = 64 << 10  # a console form's body at most (a key, a reason)
# Reached without a session: the sign-in page and the files every page needs.
OPEN = frozenset(
    {
        f"{PREFIX}/signin",
        *(f"{PREFIX}/static/{name}" for name in ("console.css", "console.js", "icon.svg")),
    }
)


def cookies(scope: Scope) -> dict[str, str]:
    """A request's cookies, name to value (the last of a name, as http.cookies had it).
    Parsed leniently, as browsers write them: a cookie of another app on
    this host (cookies ignore ports) that http.cookies would not parse, JSON or a space in
    a value, must not hide the session's."""
    jar: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                key, eq, val = part.partition("=")
                if eq and key.strip():
                    jar[key.strip()] = val.strip()
    return jar


def secure(scope: Scope, config: ServerConfig) -> bool:
    """Whether the browser talks https to us (directly, or through a trusted TLS proxy)."""
    headers = dict(scope.get("headers", []))
    return is_https(scope.get("scheme", "http"), headers, config.console.trust_forwarded_proto)


class Front(Admission):
    """The API's admission for the console: the credential is the session cookie. A
    request without a live session goes to the sign-in page (a page) or gets a 401 (a
    form post, the live list's polling), and changes nothing."""

    open_paths = OPEN

    def __init__(self, app: ASGIApp, config: ServerConfig, state: dict[str, Any]) -> None:
        super().__init__(app, config, state)
        self.sessions: Sessions = state["console_sessions"]

    def session_id(self, scope: Scope) -> str | None:
        return session_id_of(cookies(scope), secure(scope, self.config))

    def identify(self, scope: Scope) -> tuple[str, str, str] | None:
        session, why = self.sessions.get(self.session_id(scope))
        scope.setdefault("state", {})["console_session"] = session
        scope["state"]["console_why"] = why
        return None if session is None else session.identity()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            session, why = self.sessions.get(self.session_id(scope))
            if session is None:
                from .pages import signed_out

                await signed_out(scope, send, why)
                return
        await super().__call__(scope, receive, send)


class Dispatch:
    """Outermost: /console and under it to the console, the rest to the API; the first
    request starts the chart sampler (the service is up by then)."""

    def __init__(self, app: ASGIApp, config: ServerConfig, state: dict[str, Any]) -> None:
        from .pages import console_app

        self.app, self.state = app, state
        state["console_sessions"] = Sessions(
            config.console.idle_timeout_s, config.console.max_age_s
        )
        inner = BodyLimit(console_app(config, state), FORM_BYTES, FORM_BYTES)
        self.console = Front(inner, config, state)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if "console_sampler" not in self.state and "manager" in self.state:
                from .charts import Sampler

                self.state["console_sampler"] = Sampler(self.state["manager"].metrics.registry)
            path = scope["path"]
            if path == PREFIX or path.startswith(PREFIX + "/"):
                await self.console(scope, receive, with_headers(send))
                return
        await self.app(scope, receive, send)


def with_headers(send: Send) -> Send:
    """Every console answer carries the console's headers (CSP, nosniff, no framing, no
    caching): its pages set them, and so do the answers made elsewhere (a 404 or a 422
    of the framework, the admission's 401, 413 or 429), unless they set their own."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            have = {name.lower() for name, _ in message.get("headers", [])}
            extra = [
                (name.lower().encode(), value.encode())
                for name, value in HEADERS.items()
                if name.lower().encode() not in have
            ]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending


def install(app: FastAPI, config: ServerConfig, state: dict[str, Any]) -> None:
    """Serve the console at /console (unless `[console] enabled = false`)."""
    if config.console.enabled:
        app.add_middleware(Dispatch, config=config, state=state)
