"""The console's routes: sign-in and out, approvals (live), the audit trail and a run's
page, live sandboxes, charts. Every page is a Jinja2 template with autoescaping on: what a
sandbox made (code, output, error names, file names) is text, never markup. Every POST
checks the session's CSRF token and the request's Origin; a refused one changes nothing.

Who sees what (the key's role at sign-in): an operator key everything, every tenant's; an
approver key its tenant's approvals; a client key a read-only view of its tenant's runs.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.types import Scope, Send

from ..._errors import ApprovalNotFound, AuditUnavailable, SandboxError
from ..._jail import get_jail
from ..app import AUDIT_DOWN
from ..config import ServerConfig
from ..manager import SANDBOX_ID, Manager
from . import charts
from .safety import HEADERS, IMAGE_HEADERS, code_lines, image_type
from .sessions import Session, Sessions, cookie_header, csrf_ok, is_https, session_id_of

HERE = Path(__file__).parent
STATIC = {"console.css": "text/css", "console.js": "text/javascript", "icon.svg": "image/svg+xml"}
OUTCOMES = ("ok", "error", "killed", "failed", "rejected", "denied", "interrupted")
PAGE = 50  # runs per page of the audit trail
RECENT_S = 600  # decisions shown under the pending approvals: those of the last minutes
ROLES = ("operator", "approver", "client")
_log = logging.getLogger("codecage.service")

templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
)


def _when(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


templates.filters["when"] = _when
templates.filters["mib"] = lambda b: "-" if b is None else f"{b / (1 << 20):.1f} MiB"
templates.filters["pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)


def render(
    request: Request, name: str, status: int = 200, *, fragment: bool = False, **values: Any
) -> HTMLResponse:
    """A page (it shows the session's messages, once), or a fragment of one (it leaves them)."""
    session: Session | None = getattr(request.state, "console_session", None)
    flashes = session.flashes[:] if session is not None and not fragment else []
    if session is not None and not fragment:
        session.flashes.clear()
    html = templates.get_template(name).render(
        session=session, flashes=flashes, now=time.time(), **values
    )
    return HTMLResponse(html, status_code=status, headers=HEADERS)


def refused(request: Request, status: int, title: str, message: str) -> HTMLResponse:
    """A clear refusal, as a page: nothing was changed."""
    return render(request, "refused.html", status, title=title, message=message)


async def signed_out(scope: Scope, send: Send, why: str) -> None:
    """No live session: a page request goes to the sign-in page (saying if the session
    ended), anything else (a form post, the live list's poll) is a 401."""
    note = "expired" if why == "expired" else ("unknown" if why == "unknown" else "")
    if scope["method"] == "GET" and not scope["path"].endswith("/live"):
        target = "/console/signin" + (f"?{urlencode({'ended': note})}" if note else "")
        response: Response = RedirectResponse(target, status_code=303, headers=HEADERS)
    else:
        message = "your session has expired" if note == "expired" else "you are not signed in"
        body = templates.get_template("refused.html").render(
            session=None, flashes=[], now=time.time(), title="Sign in first",
            message=f"{message}: sign in again. Nothing was changed.",
        )  # fmt: skip
        response = HTMLResponse(body, status_code=401, headers=HEADERS)
    await response(scope, _nothing, send)


async def _nothing() -> Any:
    return {"type": "http.disconnect"}


# -- dependencies -----------------------------------------------------------------------


async def session_of(request: Request) -> Session:
    session = getattr(request.state, "console_session", None)
    assert session is not None  # Front lets no request without one through
    return session  # type: ignore[no-any-return]


SESSION = Depends(session_of)


def manager_of(request: Request) -> Manager:
    return request.app.state.codecage["manager"]  # type: ignore[no-any-return]


def _secure(request: Request) -> bool:
    config: ServerConfig = request.app.state.console_config
    return is_https(
        request.url.scheme, dict(request.scope["headers"]), config.console.trust_forwarded_proto
    )


def same_origin(request: Request) -> bool:
    """A state change must come from a page of ours: an Origin (or, without one, a
    Referer) naming another host is refused, whatever the token; so is a plain-http one
    when the console is known to be served over https."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is None or origin == "null":
        return origin is None
    parts = urlsplit(origin)
    if _secure(request) and parts.scheme != "https":
        return False
    return parts.netloc == request.headers.get("host", "")


async def checked(request: Request, csrf: str = Form("")) -> Session:
    """The session of a state change whose CSRF token and origin are right (else 403)."""
    session = await session_of(request)
    if not same_origin(request) or not csrf_ok(session, csrf):
        raise Forbidden("the form's security token does not match your session")
    return session


CHECKED = Depends(checked)


class Forbidden(Exception):
    pass


def need(session: Session, *roles: str) -> None:
    if session.role not in roles:
        raise Forbidden(f"a {session.role} key may not see this page")


# -- the routes -------------------------------------------------------------------------

router = APIRouter(prefix="/console", include_in_schema=False)


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in STATIC:
        return Response(status_code=404)
    data = await anyio.to_thread.run_sync((HERE / "static" / name).read_bytes)
    return Response(data, media_type=STATIC[name], headers={**HEADERS, "Cache-Control": "no-cache"})


@router.get("/signin")
async def signin_page(request: Request, ended: str = "") -> HTMLResponse:
    notes = {"expired": "Your session expired: sign in again.", "unknown": "You were signed out."}
    return render(request, "signin.html", note=notes.get(ended, ""))


@router.post("/signin")
def signin(request: Request, key: str = Form(""), name: str = Form("")) -> Response:
    if not same_origin(request):
        return refused(request, 403, "Refused", "a sign-in from another site is refused")
    manager = manager_of(request)
    found = manager.audit.identity(key.strip()) if key.strip() else None
    if found is None or found[1] not in ROLES:
        return render(request, "signin.html", 401, note="That key is not a key of this service.")
    tenant, role, key_id = found
    sessions: Sessions = request.app.state.codecage["console_sessions"]
    secure = _secure(request)
    before = session_id_of(dict(request.cookies), secure)
    if before:  # the session this browser had (if any) ends: a sign-in is a new one only
        sessions.drop(before)
    session = sessions.create(tenant, role, key_id, (name.strip() or tenant)[:64])
    response = RedirectResponse("/console", status_code=303, headers=HEADERS)
    config: ServerConfig = request.app.state.console_config
    response.headers["set-cookie"] = cookie_header(session.id, secure, config.console.max_age_s)
    return response


@router.post("/signout")
def signout(request: Request, session: Session = CHECKED) -> Response:
    request.app.state.codecage["console_sessions"].drop(session.id)
    response = RedirectResponse("/console/signin", status_code=303, headers=HEADERS)
    response.headers["set-cookie"] = cookie_header("", _secure(request), 0)
    return response


@router.get("")
async def home(session: Session = SESSION) -> Response:
    target = "/console/runs" if session.role == "client" else "/console/approvals"
    return RedirectResponse(target, status_code=303, headers=HEADERS)


def _approvals(manager: Manager, session: Session) -> dict[str, Any]:
    tenant = None if session.role == "operator" else session.tenant
    pending = sorted(manager.approvals.pending(tenant), key=lambda r: r.requested_at)
    shown = [
        {**r.to_dict(), "lines": code_lines(r.subject, r.to_dict()["findings"])} for r in pending
    ]
    decided = manager.audit.decided_approvals(since=time.time() - RECENT_S, tenant=tenant)
    # A request that moves from pending to decided keeps its id: the signature says which
    # list each id is in, or the page would keep showing it as pending.
    signature = ",".join([f"p:{r.id}" for r in pending] + [f"d:{d['id']}" for d in decided])
    return {"pending": shown, "decided": decided, "signature": signature}


@router.get("/approvals")
def approvals_page(request: Request, session: Session = SESSION) -> HTMLResponse:
    need(session, "operator", "approver")
    return render(request, "approvals.html", **_approvals(manager_of(request), session))


@router.get("/approvals/live")
def approvals_live(request: Request, session: Session = SESSION) -> HTMLResponse:
    need(session, "operator", "approver")
    return render(
        request, "_approvals.html", fragment=True, **_approvals(manager_of(request), session)
    )


@router.post("/approvals/{approval_id}")
def decide(
    request: Request,
    approval_id: str,
    decision: str = Form(""),
    reason: str = Form(""),
    session: Session = CHECKED,
) -> Response:
    need(session, "operator", "approver")
    if decision not in ("approve", "deny"):
        return refused(request, 400, "Refused", "the decision is approve or deny")
    manager = manager_of(request)
    tenant = None if session.role == "operator" else session.tenant
    try:
        manager.approvals.decide(
            approval_id[:64], decision == "approve", f"{session.name} (console)",
            reason[:4096], tenant, key=session.key_id,
        )  # fmt: skip
    except ApprovalNotFound as exc:
        session.flashes.append(str(exc))
    else:
        verb = "Approved" if decision == "approve" else "Denied"
        session.flashes.append(f"{verb} {approval_id[:64]}.")
    return RedirectResponse("/console/approvals", status_code=303, headers=HEADERS)


def _since(value: str) -> float | None:
    """A time filter as the form sends it (ISO, UTC): None if empty or malformed."""
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value[:32])
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def _filters(session: Session, params: dict[str, str]) -> dict[str, Any]:
    tenant = params.get("tenant") or None if session.role == "operator" else session.tenant
    outcome = params.get("outcome") or None
    return {
        "tenant": tenant[:128] if tenant else None,
        "sandbox_id": (params.get("sandbox") or None) and params["sandbox"][:64],
        "outcome": outcome if outcome in OUTCOMES else None,
        "killed_by": (params.get("killed_by") or None) and params["killed_by"][:64],
        "since": _since(params.get("since", "")),
        "until": _since(params.get("until", "")),
    }


@router.get("/runs")
def runs_page(
    request: Request, before: int = Query(2**62, ge=1, le=2**62), session: Session = SESSION
) -> HTMLResponse:
    params = dict(request.query_params)
    filters = _filters(session, params)
    rows = manager_of(request).audit.runs(**filters, before_rowid=before, limit=PAGE)
    query = {k: v for k, v in params.items() if k != "before" and v}
    more = urlencode({**query, "before": rows[-1]["rowid"]}) if len(rows) == PAGE else ""
    return render(
        request, "runs.html", rows=rows, params=params, outcomes=OUTCOMES, more=more,
        export=urlencode(query),
    )  # fmt: skip


@router.get("/runs/export")
def export(request: Request, session: Session = SESSION) -> StreamingResponse:
    """The matching runs as JSON Lines, oldest first: what `codecage audit export` writes."""
    filters = _filters(session, dict(request.query_params))
    audit = manager_of(request).audit

    async def lines() -> AsyncIterator[bytes]:
        rows = audit.iter_runs(**filters)
        while True:
            page = await anyio.to_thread.run_sync(
                lambda: [r for _, r in zip(range(512), rows, strict=False)]
            )
            for row in page:
                yield (json.dumps(row) + "\n").encode()
            if len(page) < 512:
                return

    headers = {**HEADERS, "Content-Disposition": 'attachment; filename="audit.jsonl"'}
    return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)


def _run(request: Request, session: Session, run_id: str) -> dict[str, Any] | None:
    tenant = None if session.role == "operator" else session.tenant
    return manager_of(request).audit.run(run_id[:64], tenant=tenant)


@router.get("/runs/{run_id}")
def run_page(request: Request, run_id: str, session: Session = SESSION) -> HTMLResponse:
    run = _run(request, session, run_id)
    if run is None:
        return refused(request, 404, "No such run", f"there is no run {run_id[:64]!r} for you")
    images = manager_of(request).audit.images(run["id"])
    for image in images:
        image["served_as"] = image_type(image.pop("data"), image["mime"])
    lines = code_lines(run["code"] or "", run.get("findings") or [])
    return render(request, "run.html", run=run, images=images, lines=lines)


@router.get("/runs/{run_id}/images/{idx}")
def run_image(request: Request, run_id: str, idx: int, session: Session = SESSION) -> Response:
    run = _run(request, session, run_id)
    found = (
        [i for i in manager_of(request).audit.images(run["id"]) if i["idx"] == idx] if run else []
    )
    if not found:
        return refused(request, 404, "No such image", "this run kept no such image")
    kind = image_type(found[0]["data"], found[0]["mime"])
    if kind is None:
        return refused(request, 415, "Not an image", "it is not the PNG or JPEG it claims to be")
    return Response(found[0]["data"], media_type=kind, headers=IMAGE_HEADERS)


def _sandbox_rows(manager: Manager) -> list[dict[str, Any]]:
    rows = []
    now, mono = time.time(), time.monotonic()
    for entry in manager.entries(None):
        sandbox, jailed = entry.sandbox, entry.sandbox._jailed
        try:
            memory, cpu_s = jailed.memory_current(), jailed.usage().cpu_s
        except OSError:
            continue  # it ended meanwhile
        rows.append({
            "id": sandbox.id, "tenant": entry.tenant, "memory": memory, "cpu_s": cpu_s,
            "age_s": now - entry.created_at, "idle_s": mono - sandbox.last_activity,
            "state": "paused" if entry.paused_at is not None else ("busy" if sandbox.busy else "idle"),
            "memory_mb": sandbox.policy.memory_mb,
        })  # fmt: skip
    return sorted(rows, key=lambda r: (r["tenant"], r["age_s"]))


def _pools(manager: Manager) -> list[dict[str, Any]]:
    jail = get_jail(manager.config.policy.isolation)
    return [
        {
            "size": p.size,
            "ready": p.ready,
            "hits": p.hits,
            "misses": p.misses,
            "replaced": p.replaced,
        }
        for p in getattr(jail, "pools", ())
    ]


@router.get("/sandboxes")
def sandboxes_page(request: Request, session: Session = SESSION) -> HTMLResponse:
    need(session, "operator")
    manager = manager_of(request)
    rows = _sandbox_rows(manager)
    tenants: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        tenants.setdefault(row["tenant"], []).append(row)
    return render(request, "sandboxes.html", tenants=tenants, pools=_pools(manager))


@router.post("/sandboxes/{sandbox_id}/kill")
def kill(request: Request, sandbox_id: str, session: Session = CHECKED) -> Response:
    need(session, "operator")
    manager = manager_of(request)
    entry = manager.find(sandbox_id) if SANDBOX_ID.fullmatch(sandbox_id) else None
    if entry is None:
        session.flashes.append(f"No live sandbox {sandbox_id[:64]}: nothing was killed.")
    else:
        why = f"killed from the console by {session.name} (operator key {session.key_id})"
        try:
            manager.note(entry.tenant, sandbox_id, "sandbox_kill", why)  # durable first
            manager.delete(entry.tenant, sandbox_id)
        except SandboxError as exc:
            session.flashes.append(f"Not killed: {exc}")
        else:
            session.flashes.append(f"Killed {sandbox_id} of {entry.tenant}.")
    return RedirectResponse("/console/sandboxes", status_code=303, headers=HEADERS)


CHARTS = {
    "runs": ("Runs per minute, by outcome", "runs/min", charts.runs_series),
    "latency": ("Run latency percentiles", "ms", charts.latency_series),
    "memory": ("Memory in use by all sandboxes", "MiB", charts.memory_series),
}


@router.get("/charts")
def charts_page(request: Request, session: Session = SESSION) -> HTMLResponse:
    need(session, "operator")
    return render(request, "charts.html", charts=CHARTS)


@router.get("/charts/{name}.svg")
def chart(request: Request, name: str, session: Session = SESSION) -> Response:
    need(session, "operator")
    if name not in CHARTS:
        return Response(status_code=404, headers=HEADERS)
    title, unit, series = CHARTS[name]
    now = time.time()
    samples = request.app.state.codecage["console_sampler"].snapshot()
    body = charts.svg(title, series(samples, now), unit, now)
    return Response(body, media_type="image/svg+xml", headers=IMAGE_HEADERS)


def console_app(config: ServerConfig, state: dict[str, Any]) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.codecage = state
    app.state.console_config = config
    app.include_router(router)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> HTMLResponse:
        return refused(request, 403, "Refused", f"{exc}: nothing was changed")

    @app.exception_handler(SandboxError)
    async def failed(request: Request, exc: SandboxError) -> HTMLResponse:
        if isinstance(exc, AuditUnavailable):
            # The sign-in page is open to anyone: the database's address and its driver's
            # words are for the service's log only (as the API's admission has it).
            _log.warning("console: %s", exc)
            return refused(request, 503, "AuditUnavailable", AUDIT_DOWN)
        return refused(request, 409, type(exc).__name__, str(exc))

    return app
