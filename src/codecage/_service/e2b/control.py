"""E2B's control plane (REST/JSON, `X-API-KEY`): sandboxes created, listed, described,
given more time and killed, as Manager operations of the key's tenant.

Templates: `base` and `code-interpreter-v1` (E2B's SDKs' defaults) are the service's
default policy; any other name is E2B's 404 "template not found". `mcp` is accepted: the
SDK then starts E2B's MCP gateway itself, which a sandbox here does not have (so the
create fails there, and the SDK kills the sandbox). A sandbox's `timeout` is
its lifetime: the Manager kills it when it passes (or pauses it: `autoPause`),
`POST /sandboxes/{id}/timeout` moves it. Every sandbox gets an envd access token (E2B's
SDKs secure every sandbox). Pause and resume are the Manager's (docs/pause.md: the cgroup
freezer; memory is always kept); `connect` resumes a paused sandbox; forks carry the
interpreter state and the workspace, and snapshots keep them for new sandboxes
(`templateID` a snapshot's id or name; docs/fork.md). Logs and network changes are not
served: E2B's answer for an API this server does not have,
with a message that says so.
"""

from __future__ import annotations

import datetime
import secrets
import time
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from ..._approvals import operation
from ..._errors import SandboxBusy, SandboxPaused, TemplateNotFound
from ..._jail import layers
from ..._text import has_lone_surrogate
from ..manager import Entry, Manager
from ..snapshots import Snapshot
from . import ENVD_VERSION, api_manager, api_tenant
from .errors import E2BError

TEMPLATES = ("base", "code-interpreter-v1")
MAX_TIMEOUT_S = 24 * 3600  # E2B's own ceiling for a sandbox's lifetime
METADATA_MAX = 64  # entries; each key and value at most METADATA_TEXT characters
METADATA_TEXT = 1024
CLIENT_ID = "codecage"

router = APIRouter()
TENANT = Depends(api_tenant)
MANAGER = Depends(api_manager)


class NewSandbox(BaseModel):
    """E2B's NewSandbox (v2): the fields this server honours; the others are accepted
    and ignored when they ask for nothing (`autoPause: false`, empty lists), refused when
    they ask for what it does not do."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    template_id: str = Field(alias="templateID", max_length=256)
    timeout: int = Field(300, ge=0, le=MAX_TIMEOUT_S, strict=True)
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = Field(None, alias="envVars")
    auto_pause: bool = Field(False, alias="autoPause")
    auto_resume: AutoResume | None = Field(None, alias="autoResume")
    allow_internet_access: bool | None = None
    secure: bool | None = None
    mcp: Any = None
    volume_mounts: list[Any] | None = Field(None, alias="volumeMounts")


class AutoResume(BaseModel):
    model_config = ConfigDict(extra="ignore")
    enabled: bool = False


class Pause(BaseModel):
    """E2B's pause request: `memory` true or false, or "full" or "filesystem" (a pause
    here always keeps the memory: all are served as a full pause)."""

    model_config = ConfigDict(extra="ignore")
    memory: bool | Literal["full", "filesystem"] | None = None


class NewSnapshot(BaseModel):
    """E2B's snapshot request: an optional name; `memory` false: the files only."""

    model_config = ConfigDict(extra="ignore")
    name: str | None = Field(None, min_length=1, max_length=256)
    memory: bool | Literal["full", "filesystem"] | None = None


class Timeout(BaseModel):
    model_config = ConfigDict(extra="ignore")
    timeout: int = Field(ge=0, le=MAX_TIMEOUT_S, strict=True)


class Connect(BaseModel):
    model_config = ConfigDict(extra="ignore")
    timeout: int = Field(300, ge=0, le=MAX_TIMEOUT_S, strict=True)


def _iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat().replace("+00:00", "Z")


def _check_text(what: str, mapping: dict[str, str] | None) -> None:
    if not mapping:
        return
    if len(mapping) > METADATA_MAX:
        raise E2BError(400, f"{what}: at most {METADATA_MAX} entries")
    for key, value in mapping.items():
        if len(key) > METADATA_TEXT or len(value) > METADATA_TEXT:
            raise E2BError(400, f"{what}: keys and values of at most {METADATA_TEXT} characters")
        if has_lone_surrogate(key) or has_lone_surrogate(value):
            raise E2BError(400, f"{what}: text must be valid Unicode")


def created(entry: Entry) -> dict[str, Any]:
    """E2B's Sandbox: what a create or a connect answers."""
    return {
        "templateID": entry.template,
        "sandboxID": entry.sandbox.id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": entry.access_token,
        "trafficAccessToken": entry.access_token,
        "domain": None,
    }


def listed(entry: Entry) -> dict[str, Any]:
    """E2B's ListedSandbox (and, with a few more fields, SandboxDetail)."""
    policy = entry.sandbox.policy
    ends = entry.expires_at
    if ends is None:  # no lifetime: the policy's idle timeout is the nearest end it has
        ends = time.time() + (policy.idle_timeout_s or MAX_TIMEOUT_S)
    return {
        "templateID": entry.template,
        "sandboxID": entry.sandbox.id,
        "clientID": CLIENT_ID,
        "startedAt": _iso(entry.created_at),
        "endAt": _iso(ends),
        "cpuCount": max(1, round(policy.cpu_cores or 1)),
        "memoryMB": policy.memory_mb or 0,
        "diskSizeMB": policy.disk_mb,
        "state": "paused" if entry.paused_at is not None else "running",
        "envdVersion": ENVD_VERSION,
        "metadata": dict(entry.metadata),
    }


def detail(entry: Entry) -> dict[str, Any]:
    return {
        **listed(entry),
        "envdAccessToken": entry.access_token,
        "trafficAccessToken": entry.access_token,
        "domain": None,
    }


def _volume_mounts(mounts: list[Any] | None) -> dict[str, str]:
    """E2B's volumeMounts ([{name, path}]) as {path: name} of the tenant's volumes
    (docs/volumes.md); the paths and names are checked where they are attached."""
    out: dict[str, str] = {}
    for mount in mounts or []:
        if not (
            isinstance(mount, dict)
            and isinstance(mount.get("name"), str)
            and isinstance(mount.get("path"), str)
        ):
            raise E2BError(400, "volumeMounts: each is {name, path}")
        if mount["path"] in out:
            raise E2BError(400, f"volumeMounts: {mount['path'][:80]!r} twice")
        out[mount["path"]] = mount["name"]
    return out


@router.post("/v2/sandboxes", status_code=201)
@router.post("/sandboxes", status_code=201)
async def create_sandbox(
    body: NewSandbox, request: Request, who: str = TENANT, manager: Manager = MANAGER
) -> dict[str, Any]:
    snapshot, template = None, None
    if body.template_id not in TEMPLATES:
        snapshot = manager.snapshots.get(who, body.template_id)
        if snapshot is None:
            template = _node_template(body.template_id)
    volumes = _volume_mounts(body.volume_mounts)
    if volumes and snapshot is not None:
        raise E2BError(400, "volumeMounts: a sandbox from a snapshot takes no volumes")
    if body.allow_internet_access:
        raise E2BError(400, "allow_internet_access: sandboxes here have no network (policy)")
    _check_text("metadata", body.metadata)
    _check_text("envVars", body.env_vars)
    token = secrets.token_urlsafe(32)
    ref = request.headers.get("idempotency-key")
    overrides: dict[str, Any] = {}
    idle, most = manager.config.policy.idle_timeout_s, manager.config.ceiling.idle_timeout_s
    if idle is not None and body.timeout > idle:  # idle for its whole lifetime, if allowed
        overrides["idle_timeout_s"] = body.timeout if most is None else min(body.timeout, most)
    if template is not None:
        overrides["template"] = template

    def work() -> Entry:
        with operation(client_ref=ref[:64] if ref else None):
            envs = dict(body.env_vars or {})
            common: dict[str, Any] = {
                "lifetime_s": body.timeout or 1,
                "metadata": body.metadata,
                "access_token": token,
                "template": body.template_id,
            }
            if snapshot is None:
                entry = manager.create(who, overrides, envs, volumes=volumes, **common)
            else:
                entry = manager.from_snapshot(
                    who, snapshot.id, overrides=overrides, envs=envs, **common
                )
        entry.on_timeout = "pause" if body.auto_pause else "kill"
        entry.auto_resume = bool(body.auto_resume and body.auto_resume.enabled)
        subject = f"create {body.template_id} timeout={body.timeout}"
        if body.auto_pause:
            subject += " autoPause" + (" autoResume" if entry.auto_resume else "")
        manager.note(who, entry.sandbox.id, "sandbox_create", subject)
        return entry

    return created(await run_in_threadpool(work))


def _node_template(template_id: str) -> str:
    """A template built on this node (docs/templates.md), by name or id; E2B's 404 else."""
    try:
        layers.resolve(template_id)
    except TemplateNotFound:
        raise E2BError(404, f"template '{template_id}' not found") from None
    return template_id


def _metadata_filter(raw: str | None) -> dict[str, str]:
    """`?metadata=k1%3Dv1%26k2%3Dv2`: as E2B's SDKs send it (each key and value quoted,
    then the pairs urlencoded)."""
    if not raw:
        return {}
    if len(raw) > 8192:
        raise E2BError(400, "metadata: a filter of at most 8192 characters")
    return {unquote(k): unquote(v) for k, v in parse_qsl(raw, keep_blank_values=True)}


@router.get("/v2/sandboxes")
@router.get("/sandboxes")
def list_sandboxes(
    metadata: str | None = Query(None),
    state: str | None = Query(None, max_length=200),
    limit: int = Query(100, ge=1, le=1000),
    who: str = TENANT,
    manager: Manager = MANAGER,
) -> list[dict[str, Any]]:
    wanted = _metadata_filter(metadata)
    states = {s.strip() for s in (state or "running").split(",") if s.strip()}
    if not states <= {"running", "paused"}:
        raise E2BError(400, f"state: running or paused, not {state!r}")
    out = []
    for entry in sorted(manager.entries(who), key=lambda e: e.created_at):
        if entry.expired() or any(entry.metadata.get(k) != v for k, v in wanted.items()):
            continue
        if ("paused" if entry.paused_at is not None else "running") in states:
            out.append(listed(entry))
    return out[:limit]


@router.get("/sandboxes/{sandbox_id}")
def get_sandbox(sandbox_id: str, who: str = TENANT, manager: Manager = MANAGER) -> dict[str, Any]:
    return detail(manager.get(who, sandbox_id))


@router.delete("/sandboxes/{sandbox_id}", status_code=204)
def kill_sandbox(sandbox_id: str, who: str = TENANT, manager: Manager = MANAGER) -> Response:
    manager.delete(who, sandbox_id)
    manager.note(who, sandbox_id, "sandbox_kill", "kill")
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/timeout", status_code=204)
def set_timeout(
    sandbox_id: str, body: Timeout, who: str = TENANT, manager: Manager = MANAGER
) -> Response:
    manager.set_lifetime(who, sandbox_id, body.timeout or 1)
    manager.note(who, sandbox_id, "sandbox_timeout", f"timeout={body.timeout}")
    return Response(status_code=204)


@router.post("/v2/sandboxes/{sandbox_id}/connect")
@router.post("/sandboxes/{sandbox_id}/connect")
def connect_sandbox(
    sandbox_id: str, body: Connect, who: str = TENANT, manager: Manager = MANAGER
) -> Response:
    """The sandbox, running, with its lifetime at least `timeout` from now: 200 for a
    running sandbox, 201 for a paused one, resumed."""
    from fastapi.responses import JSONResponse

    entry, resumed = manager.resume(who, sandbox_id, "connect")
    ends = time.time() + (body.timeout or 1)
    if entry.expires_at is None or entry.expires_at < ends:
        entry = manager.set_lifetime(who, sandbox_id, body.timeout or 1)
        manager.note(who, sandbox_id, "sandbox_timeout", f"connect timeout={body.timeout}")
    return JSONResponse(created(entry), status_code=201 if resumed else 200)


class Fork(BaseModel):
    model_config = ConfigDict(extra="ignore")
    timeout: int = Field(300, ge=0, le=MAX_TIMEOUT_S, strict=True)
    count: int = Field(1, ge=1, le=20, strict=True)


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201)
def fork_sandbox(
    sandbox_id: str, body: Fork | None = None, who: str = TENANT, manager: Manager = MANAGER
) -> list[dict[str, Any]]:
    """`count` new sandboxes with this one's state and files (docs/fork.md), each with its
    own token and lifetime `timeout`: E2B's list of `{"sandbox": ...}`. What cannot be
    carried is a 409 naming it; no sandbox is made then."""
    wanted = body or Fork()
    try:
        forks = manager.fork(
            who,
            sandbox_id,
            wanted.count,
            lifetime_s=wanted.timeout or 1,
            access_token=lambda: secrets.token_urlsafe(32),
        )
    except (SandboxBusy, SandboxPaused) as exc:
        raise E2BError(409, str(exc)) from None
    return [{"sandbox": created(entry)} for entry in forks]


def _snapshot_info(snap: Snapshot) -> dict[str, Any]:
    return {"snapshotID": snap.id, "names": list(snap.names)}


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201)
def create_snapshot(
    sandbox_id: str,
    body: NewSnapshot | None = None,
    who: str = TENANT,
    manager: Manager = MANAGER,
) -> dict[str, Any]:
    """Keep the sandbox's state and files (docs/fork.md); it runs on."""
    wanted = body or NewSnapshot()
    if wanted.name is not None and has_lone_surrogate(wanted.name):
        raise E2BError(400, "name: text must be valid Unicode")
    memory = wanted.memory not in (False, "filesystem")
    try:
        snap = manager.snapshot(who, sandbox_id, wanted.name, memory)
    except (SandboxBusy, SandboxPaused) as exc:
        raise E2BError(409, str(exc)) from None
    return _snapshot_info(snap)


@router.get("/snapshots")
def list_snapshots(
    sandbox_id: str | None = Query(None, alias="sandboxID", max_length=64),
    name: str | None = Query(None, max_length=256),
    limit: int = Query(100, ge=1, le=1000),
    who: str = TENANT,
    manager: Manager = MANAGER,
) -> list[dict[str, Any]]:
    found = manager.snapshots.list(who)
    if sandbox_id is not None:
        found = [s for s in found if s.sandbox_id == sandbox_id]
    if name is not None:
        found = [s for s in found if name in s.names]
    return [_snapshot_info(s) for s in found[:limit]]


@router.delete("/templates/{template_id}", status_code=204)
def delete_snapshot(template_id: str, who: str = TENANT, manager: Manager = MANAGER) -> Response:
    """A snapshot is gone (204), or there was none of this tenant's by that id (404)."""
    if not manager.delete_snapshot(who, template_id[:64]):
        raise E2BError(404, f"template '{template_id[:64]}' not found")
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204)
def pause_sandbox(
    sandbox_id: str, body: Pause | None = None, who: str = TENANT, manager: Manager = MANAGER
) -> Response:
    """Freeze it (memory kept): 204; 409 if it is paused already (E2B's answer)."""
    try:
        manager.pause(who, sandbox_id, f"pause memory={(body.memory if body else None) or 'full'}")
    except SandboxPaused:
        raise E2BError(409, f"sandbox {sandbox_id} is already paused") from None
    except SandboxBusy as exc:
        raise E2BError(429, str(exc)) from None
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/resume", status_code=201)
def resume_sandbox(
    sandbox_id: str, body: Connect | None = None, who: str = TENANT, manager: Manager = MANAGER
) -> dict[str, Any]:
    """E2B's older resume: 201 with the sandbox; 409 if it is not paused."""
    entry, resumed = manager.resume(who, sandbox_id, "resume")
    if not resumed:
        raise E2BError(409, f"sandbox {sandbox_id} is not paused")
    if body is not None and body.timeout:
        entry = manager.set_lifetime(who, sandbox_id, body.timeout)
    return created(entry)


@router.get("/sandboxes/{sandbox_id}/metrics")
def sandbox_metrics(
    sandbox_id: str,
    start: int | None = Query(None, ge=0, le=2**40),
    end: int | None = Query(None, ge=0, le=2**40),
    who: str = TENANT,
    manager: Manager = MANAGER,
) -> list[dict[str, Any]]:
    """One reading, now: the host's (cgroups) memory and CPU time of the sandbox (none
    when now is outside [start, end], Unix seconds)."""
    entry = manager.get(who, sandbox_id)
    now = time.time()
    if (start is not None and now < start) or (end is not None and now > end + 1):
        return []
    policy, jailed = entry.sandbox.policy, entry.sandbox._jailed
    try:
        memory = jailed.memory_current() or 0
        cpu_s = jailed.usage().cpu_s
    except OSError:
        memory, cpu_s = 0, 0.0
    age = max(now - entry.created_at, 1e-3)
    cores = policy.cpu_cores or 1
    return [
        {
            "timestamp": _iso(now),
            "timestampUnix": int(now),
            "cpuCount": max(1, round(cores)),
            "cpuUsedPct": round(min(100.0, 100 * cpu_s / age / cores), 2),
            "memUsed": int(memory),
            "memTotal": (policy.memory_mb or 0) << 20,
            "memCache": 0,
            "diskUsed": 0,
            "diskTotal": policy.disk_mb << 20,
        }
    ]


_UNSERVED = ("refreshes", "logs", "network")


@router.api_route("/sandboxes/{sandbox_id}/{action}", methods=["GET", "POST", "PUT"])
def unserved(
    sandbox_id: str, action: str, who: str = TENANT, manager: Manager = MANAGER
) -> Response:
    manager.get(who, sandbox_id)  # another tenant's, or none: 404 first
    if action in _UNSERVED:
        raise E2BError(501, f"{action}: this server (codecage) does not {action} sandboxes")
    raise E2BError(404, f"no route /sandboxes/{{id}}/{action}")
