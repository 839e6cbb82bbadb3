"""E2B's API in front of codecage's service, for E2B's unmodified SDKs (docs/e2b.md).

With `E2B_API_URL` and `E2B_SANDBOX_URL` both set to the service's address, E2B's clients
send everything here; `Dispatch` (the outermost ASGI layer) tells the requests apart:

- a request with `E2b-Sandbox-Id` is for a sandbox's own ports: `E2b-Sandbox-Port` 49983
  is envd (`/health`, `/files`, the Connect services: `envd.py`, `filesystem.py`,
  `process.py`), 49999 the code interpreter (`interpreter.py`); any other port is the
  proxy's 502 "port is not open". It is authenticated by the sandbox's id and its access
  token (`X-Access-Token`, or a signed `/files` URL), which name the tenant: an unknown id
  is the proxy's 502 "was not found", a wrong token 401;
- a request for `/sandboxes...` or `/v2/sandboxes...` is the control plane (`control.py`),
  authenticated by `X-API-KEY`, a codecage API key;
- everything else is codecage's own API, unchanged.

Each surface is a FastAPI app of its own, behind the same admission (keys checked from the
headers before any body, each tenant's requests in flight capped, slow bodies cut off) and
body limits as codecage's API, with E2B's error bodies. Every operation goes to the same
Manager: the same tenants, quotas, policy ceiling, approvals and audit log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import anyio
from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ..._errors import QuotaExceeded, SandboxError
from ..app import Admission, BodyLimit, Refused, answer_early
from .errors import NOT_FOUND, PAUSED, PORT_NOT_OPEN, E2BError, body, install_handlers

if TYPE_CHECKING:
    from ..config import ServerConfig
    from ..manager import Entry, Manager

ENVD_PORT = 49983
INTERPRETER_PORT = 49999
# The modules whose `router` (an APIRouter) each surface serves, in this order.
ENVD_MODULES = ["envd", "filesystem"]

ENVD_MODULES += ["process"]  # e2b-proc

INTERPRETER_MODULES: list[str] = ["interpreter"]

CONTROL_MODULES = ["control"]
CONTROL_PREFIXES = ("/sandboxes", "/v2/sandboxes", "/snapshots", "/templates")
ENVD_VERSION = "0.6.4"  # the envd features E2B's SDKs may use against this service (docs/e2b.md)
DEFAULT_USER = "user"


@dataclass
class SandboxAccess:
    """Who a sandbox request is for: the sandbox (its id and Manager entry) and its tenant,
    as `X-Access-Token` (or a URL's signature) proved; `user` is what E2B's clients ask
    to run as (`Authorization: Basic`), else the default."""

    sandbox_id: str
    tenant: str
    entry: Entry
    user: str
    manager: Manager


async def sandbox_access(request: Request) -> SandboxAccess:
    """The dependency of every route on a sandbox's ports (set by the admission layer)."""
    access = request.scope.get("state", {}).get("e2b_access")
    if access is None:  # unreachable: the admission layer answered already
        raise E2BError(401, "unauthenticated")
    return access  # type: ignore[no-any-return]


async def api_tenant(request: Request) -> str:
    """The tenant of a control-plane request's `X-API-KEY` (set by the admission layer)."""
    who = request.scope.get("state", {}).get("identity")
    if who is None:
        raise E2BError(401, "Invalid API key")
    return str(who[0])


async def api_manager(request: Request) -> Manager:
    return request.app.state.codecage["manager"]  # type: ignore[no-any-return]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _basic_user(scope: Scope) -> str:
    scheme, _, encoded = (_header(scope, b"authorization") or "").partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return DEFAULT_USER
    try:
        user = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")[0]
    except (ValueError, UnicodeDecodeError):
        raise Refused(401, "a malformed Authorization: Basic header") from None
    return user or DEFAULT_USER


def signature(path: str, operation: str, user: str, token: str, expiration: int | None) -> str:
    """E2B's v1 signature of a file URL (`Sandbox.download_url`, `upload_url`)."""
    raw = f"{path}:{operation}:{user}:{token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode()


SIGNED_FIELDS = ("path", "username", "signature", "signature_expiration")


def signed_query(scope: Scope) -> dict[str, str] | None:
    """A `/files` query's signed fields, parsed as the routes parse them (Starlette's
    parse_qsl, blanks kept); None when one of them is given twice. The routes read a
    field's last value, so a URL signed for one `path` with a second `path` appended
    would pass the signature on one and act on the other."""
    pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    found: dict[str, str] = {}
    for key, value in pairs:
        if key in SIGNED_FIELDS:
            if key in found:
                return None
            found[key] = value
    return found


def _signed(scope: Scope, token: str) -> bool:
    """A `/files` request whose query carries a valid, unexpired signature."""
    if scope["path"] != "/files" or scope["method"] not in ("GET", "POST"):
        return False
    query = signed_query(scope)
    if query is None:
        raise Refused(401, f"a signed URL gives each of {', '.join(SIGNED_FIELDS)} at most once")
    given = query.get("signature", "")
    if not given:
        return False
    raw_expiration = query.get("signature_expiration")
    expiration = None
    if raw_expiration is not None:
        if not raw_expiration.lstrip("-").isdigit() or len(raw_expiration) > 20:
            raise Refused(401, "invalid signature expiration")
        expiration = int(raw_expiration)
        if expiration < time.time():
            raise Refused(401, "signature is already expired")
    operation = "read" if scope["method"] == "GET" else "write"
    path, user = query.get("path", ""), query.get("username", "")
    wanted = signature(path, operation, user, token, expiration)
    return hmac.compare_digest(wanted.encode(), given.encode())


class Front(Admission):
    """Codecage's admission with E2B's credentials and error bodies. `surface` is
    "control" (X-API-KEY) or "sandbox" (the sandbox's id and access token)."""

    open_paths = frozenset()

    def __init__(self, app: ASGIApp, config: ServerConfig, state: dict[str, Any], surface: str):
        super().__init__(app, config, state)
        self.surface = surface

    def identify(self, scope: Scope) -> tuple[str, str, str] | None:
        audit, manager = self.state.get("audit"), self.state.get("manager")
        if audit is None or manager is None:
            raise Refused(503, "the service is starting")
        if self.surface == "control":
            key = _header(scope, b"x-api-key")
            who = audit.identity(key.strip()) if key else None
            if who is not None and who[1] != "client":
                raise Refused(403, "this key may only answer approvals")
            return who
        sandbox_id = _header(scope, b"e2b-sandbox-id") or ""
        entry = manager.find(sandbox_id)
        if entry is None:
            raise Refused(502, NOT_FOUND.format(sandbox_id[:64]))
        # E2B's code-interpreter SDK sends X-Access-Token on /execute only, and on every
        # call the traffic token the control plane gave it (trafficAccessToken): the same.
        token = _header(scope, b"x-access-token") or _header(scope, b"e2b-traffic-access-token")
        wanted = entry.access_token
        if wanted is None:
            raise Refused(401, "this sandbox was not created through E2B's API")
        if token is not None:
            if not hmac.compare_digest(token.encode(), wanted.encode()):
                raise Refused(401, "invalid access token")
        elif not _signed(scope, wanted):
            raise Refused(401, "missing access token (X-Access-Token) or URL signature")
        user = _basic_user(scope)
        if entry.paused_at is not None and not entry.auto_resume:
            raise Refused(502, PAUSED.format(sandbox_id))  # E2B's proxy: it answers nothing
        access = SandboxAccess(sandbox_id, entry.tenant, entry, user, manager)
        scope.setdefault("state", {})["e2b_access"] = access
        return (entry.tenant, "client", f"sandbox:{sandbox_id}")

    async def admitted(self, scope: Scope) -> None:
        """autoResume: a request to the ports of a paused sandbox created with it resumes
        it, once admitted (the tenant's requests in flight), in a worker thread: a resume
        waits for the audit record and for a pause in progress, never on the event loop."""
        access: SandboxAccess | None = scope.get("state", {}).get("e2b_access")
        if access is None or access.entry.paused_at is None:
            return
        why = "autoResume: a request to its ports"
        try:
            await anyio.to_thread.run_sync(
                access.manager.resume, access.tenant, access.sandbox_id, why
            )
        except QuotaExceeded as exc:
            raise Refused(429, str(exc)) from None
        except SandboxError as exc:
            raise Refused(502, f"{NOT_FOUND.format(access.sandbox_id)}: {exc}") from None

    async def refuse(
        self,
        send: Send,
        status: int,
        kind: str,
        message: str,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        if status == 401 and self.surface == "control" and message == "missing or invalid API key":
            message = "Invalid API key, it must be a codecage key of this service (X-API-KEY)"
        await answer_early(send, status, body(status, message))


class Ports:
    """A sandbox request to the app of its `E2b-Sandbox-Port`."""

    def __init__(self, apps: dict[int, ASGIApp]) -> None:
        self.apps = apps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = _header(scope, b"e2b-sandbox-port") or ""
        app = self.apps.get(int(raw)) if raw.isdigit() and len(raw) <= 5 else None
        if app is None:
            sandbox_id = (_header(scope, b"e2b-sandbox-id") or "")[:64]
            message = PORT_NOT_OPEN.format(sandbox_id, raw[:8] or "(none)")
            await answer_early(send, 502, body(502, message))
            return
        await app(scope, receive, send)


def _surface(state: dict[str, Any], modules: list[str], surface: str) -> FastAPI:
    from .connect import unknown_procedure

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.codecage = state
    install_handlers(app, surface)
    for name in modules:
        module = importlib.import_module(f"{__name__}.{name}")
        app.include_router(module.router)
    if surface == "envd":
        app.include_router(unknown_procedure())
    return app


class Dispatch:
    """The outermost layer: a request to the E2B surface it is for, else to codecage's."""

    def __init__(self, app: ASGIApp, config: ServerConfig, state: dict[str, Any]) -> None:
        self.app, self.state = app, state
        default = config.max_code_bytes + (1 << 20)

        def refuse(send: Send, status: int, kind: str, message: str, extra: Any) -> Any:
            return answer_early(send, status, body(status, message))

        def is_upload(scope: Scope) -> bool:
            return bool(scope["method"] == "POST" and scope["path"] == "/files")

        control = _surface(state, CONTROL_MODULES, "control")
        ports: dict[int, ASGIApp] = {ENVD_PORT: _surface(state, ENVD_MODULES, "envd")}
        if INTERPRETER_MODULES:
            ports[INTERPRETER_PORT] = _surface(state, INTERPRETER_MODULES, "interpreter")
        limited_control = BodyLimit(control, default, default, refuse=refuse)
        limited_ports = BodyLimit(
            Ports(ports), default, config.max_upload_bytes, is_upload=is_upload, refuse=refuse
        )
        self.control = Front(limited_control, config, state, "control")
        self.sandbox = Front(limited_ports, config, state, "sandbox")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = _by_host(scope)
            if scope["path"] == "/files" and _header(scope, b"e2b-sandbox-id") is None:
                scope = _by_signature(scope, self.state)
            if _header(scope, b"e2b-sandbox-id") is not None:
                await self.sandbox(scope, receive, send)
                return
            path = scope["path"]
            if any(path == p or path.startswith(p + "/") for p in CONTROL_PREFIXES):
                await self.control(scope, receive, send)
                return
        await self.app(scope, receive, send)


HOSTED = re.compile(r"([0-9]{1,5})-([0-9a-f]{32})\.")  # a sandbox id: 32 hex digits


def _by_host(scope: Scope) -> Scope:
    """E2B's hosted addressing, `{port}-{sandbox id}.{domain}` (behind a TLS proxy that
    hands every such host to this service: docs/e2b.md), as the headers the SDKs send
    with `E2B_SANDBOX_URL`: what a signed file URL opened by any HTTP client carries."""
    if _header(scope, b"e2b-sandbox-id") is not None:
        return scope
    found = HOSTED.match((_header(scope, b"host") or "").lower())
    if found is None:
        return scope
    port, sandbox_id = found.group(1).encode(), found.group(2).encode()
    headers = [*scope.get("headers", []), (b"e2b-sandbox-id", sandbox_id)]
    headers.append((b"e2b-sandbox-port", port))
    return {**scope, "headers": headers}


def _by_signature(scope: Scope, state: dict[str, Any]) -> Scope:
    """A signed `/files` URL that names no sandbox (E2B_SANDBOX_URL is one address for
    all): the sandbox whose token made the signature, if one did (expired or not: the
    admission then says which). Else it goes on as it came, and is refused for what it
    lacks."""
    manager, query = state.get("manager"), signed_query(scope)
    if query is None:  # refused by the admission if it reaches a sandbox
        return scope
    given = query.get("signature", "")
    if manager is None or not given.startswith("v1_") or len(given) > 100:
        return scope
    raw = query.get("signature_expiration")
    expiration = (
        int(raw) if raw is not None and raw.lstrip("-").isdigit() and len(raw) < 20 else None
    )
    operation = "read" if scope["method"] == "GET" else "write"
    path, user = query.get("path", ""), query.get("username", "")
    for sandbox_id, token in manager.tokens():
        wanted = signature(path, operation, user, token, expiration)
        if hmac.compare_digest(wanted.encode(), given.encode()):
            headers = [*scope.get("headers", []), (b"e2b-sandbox-id", sandbox_id.encode())]
            headers.append((b"e2b-sandbox-port", str(ENVD_PORT).encode()))
            return {**scope, "headers": headers}
    return scope


def install(app: FastAPI, config: ServerConfig, state: dict[str, Any]) -> None:
    """Put E2B's API in front of codecage's app (`create_app` calls it)."""
    app.add_middleware(Dispatch, config=config, state=state)
