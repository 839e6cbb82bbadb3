"""The service's configuration (`codecage serve --config FILE`, TOML)."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .._errors import PolicyError
from .._policy import SEVERITIES, Policy
from .._wheelhouse import canonical

if TYPE_CHECKING:
    from .audit import AuditLog


class Quotas(BaseModel):
    model_config = ConfigDict(extra="forbid")
    live_sandboxes: int = Field(20, ge=1)
    runs_per_minute: int = Field(600, ge=1)
    # Operations of one tenant waiting for a person's yes at once (each holds a worker thread).
    pending_approvals: int = Field(16, ge=1)
    # Requests of one tenant in flight at once (each may hold one of the shared worker
    # threads); one-shot runs count here too. Beyond: 429 at once.
    concurrent_requests: int = Field(32, ge=1)
    # Operations on one sandbox at once: one runs, the others wait their turn. Beyond: 409.
    sandbox_queue: int = Field(4, ge=1)
    # Host memory a tenant's file transfers may hold at once (each transfer holds at most
    # a few chunks, TRANSFER_BUFFER_MB). Beyond: 429.
    transfer_buffer_mb: int = Field(64, ge=1)
    # Sandboxes of one tenant paused at once (each keeps its memory charged). Beyond: 429.
    paused_sandboxes: int = Field(4, ge=0)
    # Snapshots a tenant keeps (docs/fork.md), and their bytes in all. Beyond: 429.
    snapshots: int = Field(16, ge=0)
    snapshot_mb: int = Field(4096, ge=0)
    # Volumes a tenant keeps (docs/volumes.md), and their sizes in all. Beyond: 429.
    volumes: int = Field(16, ge=0)
    volume_mb: int = Field(16384, ge=0)


class Console(BaseModel):
    """The operator's web console at /console (docs/console.md)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    # A signed-in session ends after this long without a request, and this long after
    # sign-in whatever happens.
    idle_timeout_s: float = Field(1800.0, gt=0)
    max_age_s: float = Field(12 * 3600.0, gt=0)
    # Behind a TLS proxy: believe its `X-Forwarded-Proto: https` (cookies are then marked
    # Secure). Off by default: a client talking to the service directly could send it.
    trust_forwarded_proto: bool = False


class ServerConfig(BaseModel):
    """Defaults are safe for one machine on loopback."""

    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # The audit log: an SQLite file, or a PostgreSQL database (`postgresql://user@host/db`;
    # libpq's PG* variables and ~/.pgpass fill what the URL leaves out).
    db: str = "/var/lib/codecage/audit.db"
    # This node's name in the audit log's rows (None: the host's name): its restart marks
    # only its own unfinished runs interrupted.
    node: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    # Where snapshots are kept (None: a `snapshots` directory beside the audit log).
    snapshot_dir: str | None = None
    # The operator's wheelhouse: the wheels a sandbox's `pip install` may take
    # (None: $CODECAGE_WHEELHOUSE, else /var/lib/codecage/wheelhouse; docs/packages.md).
    wheelhouse: str | None = None
    # The node's built templates (docs/templates.md; None: CODECAGE_TEMPLATES, default
    # /var/lib/codecage/templates).
    template_dir: str | None = None
    # Where volumes are kept (None: a `volumes` directory beside the audit log).
    volume_dir: str | None = None
    # What one run may add to the audit log: its code up to this many bytes (the full length
    # and sha256 are always kept).
    audit_code_bytes: int = Field(64 << 10, ge=0)
    # New runs are refused (503) while the audit log's filesystem has less free than this.
    audit_min_free_mb: int = Field(256, ge=0)
    # Finished runs older than this are deleted, by the service as it goes and by
    # `codecage audit prune` (None: kept until pruned by hand).
    audit_retention_days: float | None = Field(None, gt=0)
    max_code_bytes: int = Field(10 << 20, ge=1)
    max_upload_bytes: int = Field(100 << 20, ge=1)
    # Limits that protect the service itself (docs/service.md, "Limits"):
    worker_threads: int = Field(256, ge=4, le=4096)  # the shared pool for blocking work
    max_connections: int = Field(512, ge=1)  # beyond: 503 (uvicorn's limit_concurrency)
    header_timeout_s: float = Field(10.0, gt=0)  # a request's headers must arrive in time
    body_timeout_s: float = Field(30.0, gt=0)  # the longest silence within a request body
    keep_alive_s: int = Field(5, ge=1)  # an idle connection between requests
    # The warm pool: sandboxes of the default policy forked ahead of demand (0: none).
    pool_size: int = Field(4, ge=0, le=10000)
    pool_refill_per_s: float = Field(50.0, gt=0)
    template_max_age_s: float = Field(3600.0, gt=0)
    # On SIGTERM, runs in flight get this long to finish; then their sandboxes are killed.
    shutdown_grace_s: float = Field(5.0, ge=0)
    # Who may answer approvals: any key of the tenant ("tenant"), or only keys created with
    # `codecage keys create --role approver` ("approver_keys").
    approvers: Literal["tenant", "approver_keys"] = "tenant"
    # Sandboxes start from `policy`; a tenant may override fields up to `ceiling`.
    policy: Policy = Policy()
    ceiling: Policy = Policy(
        memory_mb=4096, cpu_cores=2.0, cpu_s=3600, pids_max=512, disk_mb=4096, tmp_mb=1024,
        shm_mb=1024, timeout_s=600, idle_timeout_s=3600, paused_timeout_s=7 * 86400,
        output_bytes=16 << 20,
    )  # fmt: skip
    quotas: Quotas = Field(default_factory=lambda: Quotas(live_sandboxes=20, runs_per_minute=600))
    console: Console = Field(default_factory=Console)

    def open_audit(self) -> AuditLog:
        """The audit log, with this config's bounds."""
        from .audit import AuditLog

        retain = self.audit_retention_days
        return AuditLog(
            self.db,
            code_keep_bytes=self.audit_code_bytes,
            min_free_bytes=self.audit_min_free_mb << 20,
            retain_s=None if retain is None else retain * 86400,
            node=self.node,
        )

    def state_dir(self) -> Path:
        """Where this node keeps its own files by default (volumes, snapshots): beside an
        SQLite audit log, else /var/lib/codecage."""
        from .db import is_postgres

        return Path("/var/lib/codecage") if is_postgres(self.db) else Path(self.db).parent

    @classmethod
    def load(cls, path: str | Path | None, **overrides: Any) -> ServerConfig:
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise PolicyError(f"cannot read config {path}: {exc}") from None
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ValidationError as exc:
            raise PolicyError(f"config: {exc}") from None


def check_fits(config: ServerConfig, total_memory_mb: int, total_pids: int) -> None:
    """At start-up: the processes one tenant may hold by quota (its live sandboxes, one-shot
    runs included, each at the ceiling) must fit in what all sandboxes together may use,
    and one sandbox at the ceiling must fit in the memory of all. Memory over-commits on
    purpose past that (the parent cgroup's cap turns a sum too large into an OOM kill
    inside a sandbox, never on the host); processes do not, since a fork bomb would spend
    the whole budget of every tenant. PolicyError, naming the knobs, otherwise."""
    quota = config.quotas.live_sandboxes
    problems = []
    per = [config.ceiling.pids_max, config.policy.pids_max]
    if None in per:
        problems.append(
            "pids_max is unlimited in the service's policy or ceiling: every sandbox needs a "
            f"process limit within the {total_pids} of all sandboxes together"
        )
    elif max(p or 0 for p in per) * quota > total_pids:
        most = max(p or 0 for p in per)
        problems.append(
            f"ceiling pids_max={most} x quotas.live_sandboxes={quota} = {most * quota} "
            f"processes, over the {total_pids} of all sandboxes together "
            "(CODECAGE_TOTAL_PIDS): lower the ceiling or the quota"
        )
    memory = max(config.ceiling.memory_mb or 0, config.policy.memory_mb or 0)
    if config.ceiling.memory_mb is None or memory > total_memory_mb:
        problems.append(
            f"ceiling memory_mb={config.ceiling.memory_mb} does not fit in the "
            f"{total_memory_mb} MiB of all sandboxes together (CODECAGE_TOTAL_MEMORY_MB)"
        )
    if problems:
        raise PolicyError("config does not fit this host: " + "; ".join(problems))


def within(base: Policy, requested: dict[str, Any], ceiling: Policy) -> Policy:
    """`base` with a tenant's overrides, each no looser than the operator's ceiling; the
    guards (module lists, static analysis, approvals) can only be made stricter than `base`."""
    policy = Policy(**(base.model_dump() | requested))
    for name in requested:
        if name == "template":  # any of the node's templates (docs/templates.md)
            continue
        if name in GUARDS:
            if not GUARDS[name](getattr(policy, name), getattr(base, name)):
                raise PolicyError(
                    f"policy field {name!r}: the service's guard ({getattr(base, name)!r}) can "
                    "only be made stricter"
                )
            continue
        value, cap = getattr(policy, name), getattr(ceiling, name)
        if isinstance(cap, bool) or isinstance(value, bool):
            ok = cap or not value
        elif isinstance(value, (int, float)) or value is None:
            ok = cap is None or (value is not None and value <= cap)
        elif isinstance(value, tuple):
            ok = set(value) <= set(cap)
        else:
            ok = value == cap
        if not ok:
            raise PolicyError(
                f"policy field {name!r}: {value!r} is beyond what this service allows ({cap!r})"
            )
    return policy


def _severity(value: str | None, base: str | None) -> bool:
    """A severity threshold: lower (or set, where the base is off) is stricter."""
    return base is None or (value is not None and SEVERITIES.index(value) <= SEVERITIES.index(base))


# Field -> is (value, base) at least as strict as the operator's base policy?
GUARDS: dict[str, Callable[[Any, Any], bool]] = {
    "modules_deny": lambda value, base: set(base) <= set(value),
    "modules_allow": lambda value, base: (
        base is None or (value is not None and set(value) <= set(base))
    ),
    "analysis_block_at": _severity,
    "approval_findings_at": _severity,
    "approval_commands": lambda value, base: value or not base,
    "approval_packages": lambda value, base: value or not base,
    "packages_allow": lambda value, base: (
        base is None
        or (value is not None and {canonical(v) for v in value} <= {canonical(b) for b in base})
    ),
    "approval_limits_above_default": lambda value, base: value or not base,
    "approval_download_mb": lambda value, base: (
        base is None or (value is not None and value <= base)
    ),
    "approval_window_s": lambda value, base: value <= base,
}
