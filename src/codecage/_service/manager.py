"""The Manager: a tenant's sandboxes, its quotas, and an audit record around every run.

Node-local state lives here and nowhere else, so that it can move (to another node of a cluster).
A tenant only ever sees its own sandboxes: anything else is SandboxNotFound, exactly as
if it did not exist.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import hashlib
import os
import re
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from .._analysis import analyze
from .._api import check_envs, prepare_code, run_prepared
from .._approvals import ApprovalRequest, Approvals, Decision, Gate, operation
from .._errors import (
    ApprovalDenied,
    CodeRejected,
    QuotaExceeded,
    SandboxBusy,
    SandboxError,
    SandboxNotFound,
    SandboxPaused,
    SnapshotNotFound,
    WatcherNotFound,
)
from .._jail import get_jail
from .._jail.pool import Pool
from .._models import Execution, Finding
from .._policy import Policy
from .._processes import PtySize, check_user, start_process
from .._sandbox import (
    FILE_CHUNK,
    CommandResult,
    EntryInfo,
    FilesystemEvent,
    Sandbox,
    WatchHandle,
)
from .._volumes import Volume, Volumes
from .audit import AuditLog
from .config import ServerConfig, within
from .processes import ProcessRecords
from .snapshots import Snapshot, SnapshotStore

EventCallback = Callable[[dict[str, Any]], None]
T = TypeVar("T")
WATCHERS = 16  # directory watchers per sandbox kept by the service (the kernel's own bound)


# What a sandbox id is (HostSandbox: 16 random bytes in hex); anything else names none.
SANDBOX_ID = re.compile(r"[0-9a-f]{32}")

# Host memory one file transfer holds at most: a chunk, its base64 frame and their copies.
TRANSFER_BUFFER_MB = 4 * (FILE_CHUNK >> 20)


@dataclass
class Started:
    """A run admitted and durably recorded, not yet run (`Manager.start_execute`,
    `start_run`): its code prepared and analysed once, its sandbox looked up once and its
    place (in the sandbox's queue, or in the live-sandbox quota) held until `Manager.carry_out`
    releases it."""

    run_id: str
    tenant: str
    kind: str
    code: str
    policy: Policy
    findings: list[Finding] | None  # None: analysed when it runs
    entry: Entry | None  # execute: the sandbox; a one-shot run: None
    release: Callable[[], object] = lambda: None


@dataclass
class Entry:
    tenant: str
    sandbox: Sandbox
    created_at: float = field(default_factory=time.time)
    queued: int = 0  # operations running or waiting on this sandbox (Manager._lock)
    transfer: threading.Lock = field(default_factory=threading.Lock)  # one file transfer
    pausing: threading.Lock = field(default_factory=threading.Lock)  # pause, resume: in turn
    # What E2B's API keeps of a sandbox (docs/e2b.md): its labels, the token its own ports
    # (envd) want, when it ends (time.time(); None: when its policy ends it), its template.
    metadata: dict[str, str] = field(default_factory=dict)
    access_token: str | None = None
    expires_at: float | None = None
    template: str = ""
    watchers: dict[str, Any] = field(default_factory=dict)  # E2B's watchers on this sandbox
    # Pausing (docs/pause.md): when it was paused (time.time(); None: running); what its
    # lifetime's end does (E2B's autoPause: "pause", else "kill"); whether a request to
    # its ports resumes it (E2B's autoResume).
    paused_at: float | None = None
    on_timeout: str = "kill"
    auto_resume: bool = False
    lifetime_s: float | None = None  # as created: what a resume after an autoPause gives

    def due(self, now: float | None = None) -> bool:
        """Its lifetime has passed (a paused sandbox's lifetime clock stands still)."""
        if self.paused_at is not None:
            return False
        return self.expires_at is not None and (now or time.time()) >= self.expires_at

    def expired(self, now: float | None = None) -> bool:
        """Its lifetime has passed and that ends it (with autoPause, it is paused instead)."""
        return self.on_timeout != "pause" and self.due(now)


class Metrics:
    """Counters the /metrics endpoint renders (prometheus_client objects). `registry` holds
    aggregate series only (no tenant, no sandbox id); `detail` the per-sandbox ones."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.detail = CollectorRegistry()
        self.live = Gauge("codecage_sandboxes_live", "Sandboxes alive", registry=self.registry)
        self.runs = Counter(
            "codecage_runs",
            "Runs by outcome",
            ["kind", "outcome", "killed_by"],
            registry=self.registry,
        )
        self._gauge = Gauge
        self.latency = Histogram(
            "codecage_run_seconds",
            "Wall time of runs, as the host measured it",
            ["kind"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
            registry=self.registry,
        )

    def watch_sandboxes(self, manager: Manager) -> None:
        """Memory (the host's reading of each memory cgroup), at scrape time: the sum in the
        aggregate registry; each sandbox's, labelled with its tenant and id, in `detail`,
        which /metrics shows to operator keys only."""
        from prometheus_client.core import GaugeMetricFamily

        def readings() -> Iterator[tuple[Entry, int]]:
            for entry in list(manager._sandboxes.values()):
                jailed = entry.sandbox._jailed
                if not jailed.alive:
                    continue
                try:
                    current = jailed.memory_current()
                except OSError:
                    continue  # ended meanwhile
                if current is not None:
                    yield entry, current

        class Total:
            def collect(self) -> Iterator[GaugeMetricFamily]:
                total = sum(current for _, current in readings())
                yield GaugeMetricFamily(
                    "codecage_sandboxes_memory_bytes",
                    "Memory charged to all live sandboxes",
                    value=float(total),
                )

        class Each:
            def collect(self) -> Iterator[GaugeMetricFamily]:
                family = GaugeMetricFamily(
                    "codecage_sandbox_memory_bytes",
                    "Memory charged to each sandbox",
                    labels=["tenant", "sandbox"],
                )
                for entry, current in readings():
                    family.add_metric([entry.tenant, entry.sandbox.id], float(current))
                yield family

        self.registry.register(Total())
        self.detail.register(Each())

    def watch_pool(self, pool: Pool) -> None:
        """Pool state, read when /metrics is scraped."""
        for name, doc, read in (
            ("codecage_pool_target", "Sandboxes the warm pool keeps ready", lambda: pool.size),
            ("codecage_pool_ready", "Sandboxes ready in the warm pool", lambda: pool.ready),
            ("codecage_pool_hits", "Creates served from the pool", lambda: pool.hits),
            ("codecage_pool_misses", "Creates that started cold", lambda: pool.misses),
            ("codecage_pool_replaced", "Pooled sandboxes that died waiting", lambda: pool.replaced),
        ):
            self._gauge(name, doc, registry=self.registry).set_function(read)


class Manager:
    def __init__(self, config: ServerConfig, audit: AuditLog) -> None:
        self.config = config
        if config.template_dir is not None:  # where the jail looks templates up
            os.environ["CODECAGE_TEMPLATES"] = config.template_dir
        self.audit = audit
        self._snapshots: SnapshotStore | None = None
        self.metrics = Metrics()
        self.metrics.watch_sandboxes(self)
        self._lock = threading.Lock()
        self._sandboxes: dict[str, Entry] = {}
        self._recent: dict[str, collections.deque[float]] = collections.defaultdict(
            collections.deque
        )
        self._busy = 0
        self._oneshots: collections.Counter[str] = collections.Counter()  # /v1/run in flight
        self._buffers: collections.Counter[str] = collections.Counter()  # transfer MiB held
        self._idle = threading.Condition(self._lock)
        self._reaper: threading.Thread | None = None  # ends sandboxes whose lifetime is over
        self._closing = threading.Event()
        self.approvals = Approvals(
            on_change=self._approval_changed,
            max_pending_per_tenant=config.quotas.pending_approvals,
        )
        self.process_records = ProcessRecords(self)

    def _approval_changed(self, request: ApprovalRequest, decision: Decision | None) -> None:
        if decision is None:
            self.audit.approval_requested(request.to_dict())
        else:
            self.audit.approval_decided(request.to_dict(), decision.to_dict())

    # -- sandboxes -------------------------------------------------------------------------

    def create(
        self,
        tenant: str,
        overrides: dict[str, Any],
        envs: dict[str, str],
        *,
        lifetime_s: float | None = None,
        metadata: dict[str, str] | None = None,
        access_token: str | None = None,
        template: str = "",
        volumes: dict[str, str] | None = None,
    ) -> Entry:
        """A sandbox for the tenant, within its quota and the ceiling. `lifetime_s`: it
        is killed that long after (`set_lifetime` moves the end); `volumes`: {path: name}
        of the tenant's volumes (docs/volumes.md), each attach and detach in the audit
        log; the rest is kept for E2B's API."""
        policy = within(self.config.policy, overrides, self.config.ceiling)
        with self._lock:
            self._prune()
            live = self._live(tenant)
            if live >= self.config.quotas.live_sandboxes:
                raise QuotaExceeded(f"tenant already has {live} live sandboxes (quota)")
        gate = Gate(self.approvals, tenant=tenant)
        entry = Entry(
            tenant,
            Sandbox(
                policy,
                envs=envs,
                gate=gate,
                defaults=self.config.policy,
                wheelhouse=self.config.wheelhouse,
                **self._volume_args(tenant, volumes),
            ),
            metadata=dict(metadata or {}),
            access_token=access_token,
            template=template,
        )
        self._record_packages(entry)
        if lifetime_s is not None:
            entry.expires_at = entry.created_at + lifetime_s
            entry.lifetime_s = lifetime_s
        with self._lock:  # again: a create may have waited for approval meanwhile
            live = self._live(tenant)
            if live < self.config.quotas.live_sandboxes:
                self._sandboxes[entry.sandbox.id] = entry
                self.metrics.live.set(len(self._sandboxes))
                if entry.expires_at is not None:
                    self._reap_soon()
                return entry
        entry.sandbox.kill()
        raise QuotaExceeded(f"tenant already has {live} live sandboxes (quota)")

    def _record_packages(self, entry: Entry) -> None:
        """The wheels handed in to the sandbox's `pip install`, in the audit log (durable
        before the install runs; docs/packages.md)."""
        sandbox = entry.sandbox

        def record(run_id: str | None, wheels: list[dict[str, Any]]) -> None:
            self.audit.packages_installed(
                run_id=run_id, tenant=entry.tenant, sandbox_id=sandbox.id, wheels=wheels
            )

        sandbox.package_observer = record

    def set_lifetime(self, tenant: str, sandbox_id: str, seconds: float) -> Entry:
        """The sandbox now ends `seconds` from now (earlier or later than it would have)."""
        entry = self.get(tenant, sandbox_id)
        with self._lock:
            entry.expires_at = time.time() + seconds
            self._reap_soon()
        return entry

    def pause(self, tenant: str, sandbox_id: str, why: str = "pause") -> Entry:
        """Freeze the tenant's sandbox (docs/pause.md): within quotas.paused_sandboxes and
        quotas.runs_per_minute, never while an operation runs in it (SandboxBusy),
        SandboxPaused if it is paused."""
        entry = self.get(tenant, sandbox_id)
        self._admit(tenant)
        paused = self._pause(entry, why)
        assert paused is not None
        return paused

    def _pause(self, entry: Entry, why: str, lifetime_over: bool = False) -> Entry | None:
        """Pause and resume of one sandbox take turns (entry.pausing), so its state is the
        freezer's. `lifetime_over` (the reaper's autoPause): only if its lifetime is still
        over, under that lock (not killed, resumed or given more time since it looked);
        otherwise None and nothing is done."""
        tenant, sandbox_id = entry.tenant, entry.sandbox.id
        with entry.pausing:
            with self._lock:  # the place is taken first: two pauses at once count as two
                if lifetime_over and not (
                    self._sandboxes.get(sandbox_id) is entry and entry.sandbox.alive and entry.due()
                ):
                    return None
                if entry.paused_at is not None:
                    raise SandboxPaused(f"sandbox {sandbox_id} is already paused")
                paused = sum(
                    1
                    for e in self._sandboxes.values()
                    if e.tenant == tenant and e.paused_at is not None and e.sandbox.alive
                )
                if paused >= self.config.quotas.paused_sandboxes:
                    raise QuotaExceeded(
                        f"tenant already has {paused} paused sandboxes "
                        f"(quotas.paused_sandboxes={self.config.quotas.paused_sandboxes})"
                    )
                if entry.queued:
                    raise SandboxBusy(
                        f"sandbox {sandbox_id} has an operation running: pause it once that ended"
                    )
                entry.paused_at = time.time()
                ends = entry.expires_at
                entry.expires_at = None if lifetime_over else ends
            try:
                entry.sandbox.pause()
            except BaseException:
                with self._lock:
                    entry.paused_at, entry.expires_at = None, ends
                raise
        self.note(tenant, sandbox_id, "sandbox_pause", why)
        return entry

    def resume(self, tenant: str, sandbox_id: str, why: str = "resume") -> tuple[Entry, bool]:
        """Thaw the tenant's paused sandbox; (its entry, whether it was paused). Its
        lifetime (if it has one) is moved on by the time it spent paused. Counts against
        quotas.runs_per_minute; waits for a pause of it in progress (then thaws it)."""
        entry = self.get(tenant, sandbox_id)
        self._admit(tenant)
        with entry.pausing:
            with self._lock:
                paused_at = entry.paused_at
            if paused_at is None:
                return entry, False
            paused_for = entry.sandbox.resume()
            with self._lock:
                entry.paused_at = None
                if entry.expires_at is not None:
                    entry.expires_at += paused_for
                elif entry.lifetime_s is not None:  # paused by its lifetime's end: a new one
                    entry.expires_at = time.time() + entry.lifetime_s
                    self._reap_soon()
        self.note(tenant, sandbox_id, "sandbox_resume", f"{why} after {paused_for:.3f} s")
        return entry, True

    def fork(
        self,
        tenant: str,
        sandbox_id: str,
        count: int = 1,
        *,
        lifetime_s: float | None = None,
        access_token: Callable[[], str | None] = lambda: None,
    ) -> list[Entry]:
        """`count` new sandboxes with the tenant's sandbox's state (docs/fork.md), each
        within the live-sandbox quota, each an audit row of its own and one on the parent.
        `access_token` makes each one's token (E2B's API)."""
        parent = self.get(tenant, sandbox_id)
        if parent.paused_at is not None:
            raise SandboxPaused(f"sandbox {sandbox_id} is paused: resume it before forking it")
        with self._lock:
            live = self._live(tenant)
            if live + count > self.config.quotas.live_sandboxes:
                raise QuotaExceeded(
                    f"tenant has {live} live sandboxes: {count} more would pass its quota"
                )
        forks: list[Entry] = []
        self.enter(parent)
        try:
            for _ in range(count):
                child = Entry(
                    tenant,
                    parent.sandbox.fork(),
                    metadata=dict(parent.metadata),
                    access_token=access_token(),
                    template=parent.template,
                )
                self._record_packages(child)
                if lifetime_s is not None:
                    child.expires_at = child.created_at + lifetime_s
                    child.lifetime_s = lifetime_s
                with self._lock:
                    if self._live(tenant) >= self.config.quotas.live_sandboxes:
                        child.sandbox.kill()
                        raise QuotaExceeded("the live-sandbox quota filled up during the fork")
                    self._sandboxes[child.sandbox.id] = child
                    self.metrics.live.set(len(self._sandboxes))
                    if child.expires_at is not None:
                        self._reap_soon()
                forks.append(child)
                self.note(tenant, child.sandbox.id, "sandbox_fork", f"forked from {sandbox_id}")
        finally:
            self.leave(parent)
            if forks:
                ids = ", ".join(f.sandbox.id for f in forks)
                self.note(tenant, sandbox_id, "sandbox_fork", f"forked into {ids}")
        return forks

    # -- volumes (docs/volumes.md) ------------------------------------------------------------

    def volumes(self, tenant: str) -> Volumes:
        """The tenant's volumes, in `volume_dir`, within quotas.volumes and volume_mb."""
        config, quotas = self.config, self.config.quotas
        root = Path(config.volume_dir or config.state_dir() / "volumes")

        def on_volume(kind: str, attachment: Any) -> None:
            subject = f"{attachment.name} at {attachment.path}"
            if kind == "detach" and attachment.detach_s is not None:
                subject += f" ({attachment.detach_s * 1000:.1f} ms)"
            self.note(tenant, attachment.sandbox_id, f"volume_{kind}", subject)

        return Volumes(
            root,
            owner=tenant,
            max_count=quotas.volumes,
            max_mb=quotas.volume_mb,
            on_volume=on_volume,
        )

    def _volume_args(self, tenant: str, volumes: dict[str, str] | None) -> dict[str, Any]:
        if not volumes:
            return {}
        return {"volumes": volumes, "volume_store": self.volumes(tenant)}

    def create_volume(self, tenant: str, name: str, size_mb: int, inodes: int | None) -> Volume:
        volume = self.volumes(tenant).create(name, size_mb, inodes)
        self.note(tenant, None, "volume_create", f"{name} ({size_mb} MiB, {volume.inodes} inodes)")
        return volume

    def delete_volume(self, tenant: str, name: str) -> None:
        self.volumes(tenant).delete(name)
        self.note(tenant, None, "volume_delete", name)

    def export_volume(self, tenant: str, name: str) -> Iterator[bytes]:
        store = self.volumes(tenant)
        store.get(name)
        self.note(tenant, None, "volume_export", name)
        return store.export(name)

    def import_volume(self, tenant: str, name: str, chunks: Iterable[bytes]) -> int:
        store = self.volumes(tenant)
        store.get(name)
        files = store.import_(name, chunks)
        self.note(tenant, None, "volume_import", f"{name} ({files} members)")
        return files

    # -- snapshots (docs/fork.md) ------------------------------------------------------------

    @property
    def snapshots(self) -> SnapshotStore:
        """The tenants' snapshots, in `snapshot_dir` (made on first use)."""
        if self._snapshots is None:
            config = self.config
            root = Path(config.snapshot_dir or config.state_dir() / "snapshots")
            quotas = config.quotas
            self._snapshots = SnapshotStore(root, quotas.snapshots, quotas.snapshot_mb)
        return self._snapshots

    def snapshot(
        self, tenant: str, sandbox_id: str, name: str | None = None, memory: bool = True
    ) -> Snapshot:
        """Keep the sandbox's state (as a fork carries it) in a snapshot of the tenant's; the
        sandbox runs on. What cannot be carried is refused as a fork refuses it."""
        entry = self.get(tenant, sandbox_id)
        if entry.paused_at is not None:
            raise SandboxPaused(f"sandbox {sandbox_id} is paused: resume it first")
        made: list[Snapshot] = []
        policy = entry.sandbox.policy.model_dump(mode="json")
        with self.using(tenant, sandbox_id):
            entry.sandbox.export_state(
                lambda chunks: made.append(
                    self.snapshots.save(tenant, sandbox_id, name, policy, memory, chunks)
                ),
                memory=memory,
            )
        snap = made[0]
        self.note(tenant, sandbox_id, "sandbox_snapshot", f"{snap.id} ({snap.size} bytes)")
        return snap

    def delete_snapshot(self, tenant: str, snapshot_id: str) -> bool:
        gone = self.snapshots.delete(tenant, snapshot_id)
        if gone:
            self.note(tenant, None, "snapshot_delete", snapshot_id)
        return gone

    def from_snapshot(self, tenant: str, id_or_name: str, **create: Any) -> Entry:
        """A new sandbox of the tenant started from its snapshot (its policy, within the
        ceiling; its files and variables unpacked inside the new sandbox's jail)."""
        snap = self.snapshots.get(tenant, id_or_name)
        if snap is None:
            raise SnapshotNotFound(f"no snapshot {id_or_name!r}")
        overrides = {**snap.policy, **create.pop("overrides", {})}
        entry = self.create(tenant, overrides, create.pop("envs", {}), **create)
        try:
            entry.sandbox.import_state(self.snapshots.chunks(snap))
        except BaseException:
            self.delete(tenant, entry.sandbox.id)
            raise
        self.note(tenant, entry.sandbox.id, "sandbox_create", f"from snapshot {snap.id}")
        return entry

    def find(self, sandbox_id: str) -> Entry | None:
        """A live sandbox by its id alone, whoever's it is: for a front end whose requests
        carry a sandbox's own credentials (E2B's envd: its access token) rather than an
        API key. The caller checks those credentials before it answers anything else."""
        with self._lock:
            entry = self._sandboxes.get(sandbox_id)
        if entry is None or not entry.sandbox.alive or entry.expired():
            return None
        return entry

    def tokens(self) -> list[tuple[str, str]]:
        """(sandbox id, access token) of every live sandbox that has a token: for telling
        which sandbox a signed URL is for (the caller checks the signature against each)."""
        with self._lock:
            entries = list(self._sandboxes.items())
        return [
            (sid, e.access_token)
            for sid, e in entries
            if e.access_token is not None and e.sandbox.alive and not e.expired()
        ]

    def _reap_soon(self) -> None:
        """Start the reaper if it is not running (under _lock)."""
        if self._reaper is None and not self._closing.is_set():
            self._reaper = threading.Thread(target=self._reap, name="codecage-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """Kill the sandboxes whose lifetime is over, as it passes (checked twice a second)."""
        while not self._closing.wait(0.5):
            now = time.time()
            with self._lock:
                ended = [(sid, e) for sid, e in self._sandboxes.items() if e.due(now)]
                pausing = [(sid, e) for sid, e in ended if e.on_timeout == "pause"]
                for sid, entry in ended:
                    if entry.on_timeout != "pause":
                        del self._sandboxes[sid]
                self.metrics.live.set(len(self._sandboxes))
            for sid, entry in pausing:
                try:  # E2B's autoPause: its lifetime's end pauses it; a connect resumes it
                    # (looked at again under the entry's lock: not if it changed meanwhile)
                    self._pause(entry, "its timeout (lifetime) passed: autoPause", True)
                except SandboxBusy:
                    continue  # an operation in flight: the next round pauses it
                except SandboxError as exc:  # cannot pause (quota, backend): it ends
                    with self._lock:
                        self._sandboxes.pop(sid, None)
                    entry.sandbox._jailed.terminate(f"its timeout passed ({exc})")
                    entry.sandbox.kill()
            for _, entry in ended:
                if entry.on_timeout != "pause":
                    entry.sandbox._jailed.terminate("its timeout (lifetime) passed")
                    entry.sandbox.kill()

    def _live(self, tenant: str) -> int:
        """The tenant's live sandboxes, one-shot runs in flight included (under _lock)."""
        mine = sum(1 for e in self._sandboxes.values() if e.tenant == tenant)
        return mine + self._oneshots[tenant]

    @contextlib.contextmanager
    def oneshot(self, tenant: str) -> Iterator[None]:
        """A one-shot run's place in the live-sandbox quota, for as long as it runs."""
        with self._lock:
            self._prune()
            live = self._live(tenant)
            if live >= self.config.quotas.live_sandboxes:
                raise QuotaExceeded(f"tenant already has {live} live sandboxes (quota)")
            self._oneshots[tenant] += 1
        try:
            yield
        finally:
            with self._lock:
                self._oneshots[tenant] -= 1

    def enter(self, entry: Entry) -> None:
        """Take a place in the sandbox's queue (one runs, the others wait for its lock), or
        SandboxBusy: waiting requests hold worker threads, so the queue is short."""
        with self._lock:
            if entry.queued >= self.config.quotas.sandbox_queue:
                raise SandboxBusy(
                    f"sandbox {entry.sandbox.id} already has {entry.queued} operations running "
                    f"or waiting (quotas.sandbox_queue); try again when one has finished"
                )
            entry.queued += 1

    def leave(self, entry: Entry) -> None:
        with self._lock:
            entry.queued -= 1

    @contextlib.contextmanager
    def using(self, tenant: str, sandbox_id: str) -> Iterator[Entry]:
        """The tenant's sandbox, with a place in its queue for the duration."""
        entry = self.get(tenant, sandbox_id)
        self.enter(entry)
        try:
            yield entry
        finally:
            self.leave(entry)

    @contextlib.contextmanager
    def _transfer(self, entry: Entry) -> Iterator[None]:
        """One file transfer: its host buffers count against the tenant's
        quotas.transfer_buffer_mb, and transfers of one sandbox take turns."""
        tenant, budget = entry.tenant, self.config.quotas.transfer_buffer_mb
        with self._lock:
            if self._buffers[tenant] + TRANSFER_BUFFER_MB > budget:
                raise QuotaExceeded(
                    f"file transfers of this tenant already hold {self._buffers[tenant]} MiB "
                    f"of host buffers (quotas.transfer_buffer_mb={budget})"
                )
            self._buffers[tenant] += TRANSFER_BUFFER_MB
        try:
            with entry.transfer:
                yield
        finally:
            with self._lock:
                self._buffers[tenant] -= TRANSFER_BUFFER_MB

    def get(self, tenant: str, sandbox_id: str) -> Entry:
        if not SANDBOX_ID.fullmatch(sandbox_id):  # never looked up, nor echoed in full
            raise SandboxNotFound(f"no sandbox {sandbox_id[:64]!r}")
        with self._lock:
            entry = self._sandboxes.get(sandbox_id)
            if entry is None or entry.tenant != tenant:
                raise SandboxNotFound(f"no sandbox {sandbox_id!r}")
            if entry.expired():  # the reaper kills it within a moment
                raise SandboxNotFound(f"sandbox {sandbox_id} has ended: its lifetime passed")
            if not entry.sandbox.alive:  # its owner learns why, once
                del self._sandboxes[sandbox_id]
                raise SandboxNotFound(
                    f"sandbox {sandbox_id} has ended: {entry.sandbox._jailed.ended_because}"
                )
        return entry

    def live(self) -> int:
        """Sandboxes held (for /healthz: no lock, it never waits)."""
        return len(self._sandboxes)

    def start(self) -> None:
        """Start the service's jail (its template is warm for the first request, and its
        start-up sweep removes whatever a crashed predecessor left behind) and, with
        `pool_size`, its warm pool, watched by the metrics."""
        config = self.config
        jail = get_jail(config.policy.isolation)
        if config.pool_size:  # a backend without pools refuses (BackendUnavailable)
            pool = jail.start_pool(
                config.pool_size, config.policy, config.pool_refill_per_s, config.template_max_age_s
            )
            self.metrics.watch_pool(pool)

    def entries(self, tenant: str | None) -> list[Entry]:
        """A tenant's live sandboxes (None: every tenant's, for the operator's console)."""
        with self._lock:
            self._prune()
            return [e for e in self._sandboxes.values() if tenant in (None, e.tenant)]

    def delete(self, tenant: str, sandbox_id: str) -> None:
        entry = self.get(tenant, sandbox_id)
        self.process_records.sweep(sandbox_id)  # the ends of its processes, as they were
        entry.sandbox.kill()
        with self._lock:
            self._sandboxes.pop(sandbox_id, None)
            self.metrics.live.set(len(self._sandboxes))

    def _prune(self) -> None:
        for sid in [sid for sid, e in self._sandboxes.items() if not e.sandbox.alive]:
            del self._sandboxes[sid]
        self.metrics.live.set(len(self._sandboxes))

    def shutdown(self, wait_s: float = 15.0) -> None:
        """Kill every sandbox, then wait until the runs that were in flight are recorded."""
        self.approvals.deny_all("service", "the service is shutting down")
        self._closing.set()
        if self._reaper is not None:
            self._reaper.join()
        with self._lock:
            entries = list(self._sandboxes.values())
            self._sandboxes.clear()
        self.process_records.sweep()
        for entry in entries:
            entry.sandbox.kill()
        self.process_records.close()
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0, timeout=wait_s)

    @contextlib.contextmanager
    def _operation(self) -> Iterator[None]:
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    # -- quotas ----------------------------------------------------------------------------

    def _admit(self, tenant: str) -> None:
        now = time.monotonic()
        with self._lock:
            recent = self._recent[tenant]
            while recent and recent[0] < now - 60:
                recent.popleft()
            if len(recent) >= self.config.quotas.runs_per_minute:
                raise QuotaExceeded(
                    f"more than {self.config.quotas.runs_per_minute} runs per minute (quota)"
                )
            recent.append(now)

    # -- recorded operations ---------------------------------------------------------------

    def begin(
        self,
        tenant: str,
        sandbox_id: str | None,
        kind: str,
        code: str,
        policy: Policy,
        findings: list[Finding] | None = None,
        admit: bool = True,
        language: str | None = None,
        context_id: str | None = None,
    ) -> str:
        """Admit and durably record a run (with its static-analysis findings, and a cell's
        language and code context) before it starts. Returns the run id. `admit=False`:
        outside the run quota."""
        if admit:
            self._admit(tenant)
        run_id = secrets.token_hex(16)
        self.audit.start_run(
            run_id=run_id,
            tenant=tenant,
            sandbox_id=sandbox_id,
            kind=kind,
            code=code,
            policy=policy.model_dump(),
            findings=[dataclasses.asdict(f) for f in findings or []],
            language=language,
            context_id=context_id,
        )
        return run_id

    def note(self, tenant: str, sandbox_id: str | None, kind: str, subject: str) -> None:
        """Record an operation on a sandbox that runs nothing in it (E2B's create, kill,
        timeout, connect), durably, outside the run quota."""
        with self._lock:
            entry = self._sandboxes.get(sandbox_id or "")
        policy = entry.sandbox.policy if entry is not None else self.config.policy
        run_id = self.begin(tenant, sandbox_id, kind, subject, policy, admit=False)
        self.finish(run_id, kind, Execution())

    def finish(
        self, run_id: str, kind: str, ex: Execution, files: list[dict[str, Any]] | None = None
    ) -> None:
        output = "".join(ex.logs.stdout) + "".join(ex.logs.stderr)
        if ex.killed_by:
            outcome = "killed"
        elif ex.error is not None:
            outcome = "error"
        else:
            outcome = "ok"
        self.audit.complete_run(
            run_id,
            outcome=outcome,
            error_name=ex.error.name if ex.error else None,
            killed_by=ex.killed_by,
            limits_hit=ex.limits_hit,
            duration_ms=ex.duration_ms,
            peak_memory_mb=ex.peak_memory_mb,
            output=output,
            output_truncated=ex.truncated,
            files=files,
            # What the sandbox itself reported, kept apart from the host's readings.
            claims={"execution_count": ex.execution_count, "exit_code": ex.exit_code},
            images=_images(ex),
        )
        self.metrics.runs.labels(kind, outcome, ex.killed_by or "").inc()
        self.metrics.latency.labels(kind).observe(ex.duration_ms / 1000)

    def fail(self, run_id: str, kind: str, exc: BaseException) -> None:
        outcome = "failed"
        if isinstance(exc, (CodeRejected, ApprovalDenied)):  # the code never ran
            outcome = "rejected" if isinstance(exc, CodeRejected) else "denied"
        self.audit.complete_run(
            run_id, outcome=outcome, error_name=type(exc).__name__, output=str(exc)[:2000]
        )
        self.metrics.runs.labels(kind, outcome, "").inc()

    def _recorded(self, run_id: str, kind: str, work: Callable[[], T]) -> T:
        """Run `work` (the operation and its completion record) so that a failure is recorded
        as well, and a shutdown waits for it. Approvals it raises name this run."""
        with self._operation(), operation(run_id=run_id):
            try:
                return work()
            except BaseException as exc:
                self.fail(run_id, kind, exc)
                raise

    def start_execute(
        self,
        tenant: str,
        sandbox_id: str,
        code: str | bytes,
        *,
        context: str | None = None,
        language: str | None = None,
    ) -> Started:
        """A cell for the tenant's sandbox, up to its durable start record: the code is
        prepared and size-checked, the sandbox looked up and a place in its queue taken
        (SandboxBusy), the code analysed (Python only), the run admitted (quota) and
        recorded with its language and code context (`carry_out` gets the same two)."""
        text = prepare_code(code, self.config.max_code_bytes)
        entry = self.get(tenant, sandbox_id)
        self.enter(entry)  # a place in the sandbox's short queue, or 409
        try:
            policy = entry.sandbox.policy
            lang, cid = entry.sandbox._cell_context(context, language)
            findings = analyze(text) if lang == "python" else []  # Python's says nothing of bash
            run_id = self.begin(
                tenant, sandbox_id, "execute", text, policy, findings, language=lang, context_id=cid
            )
        except BaseException:
            self.leave(entry)
            raise
        release = partial(self.leave, entry)
        return Started(run_id, tenant, "execute", text, policy, findings, entry, release)

    def check_policy(self, overrides: dict[str, Any]) -> None:
        """PolicyError if `overrides` would not be within the ceiling."""
        within(self.config.policy, overrides, self.config.ceiling)

    def batch_width(self, tenant: str, asked: int | None) -> int:
        """How many runs of a batch go at once: what was asked (default two per core),
        within the tenant's live-sandbox quota left (one-shot runs count), at least one."""
        width = asked or 2 * (os.cpu_count() or 1)
        with self._lock:
            self._prune()
            left = self.config.quotas.live_sandboxes - self._live(tenant)
        return max(1, min(width, left))

    def live_by_tenant(self) -> dict[str, int]:
        """Live sandboxes and one-shot runs per tenant (a cluster's quota adds the nodes')."""
        with self._lock:
            self._prune()
            tenants = {e.tenant for e in self._sandboxes.values()} | set(self._oneshots)
            return {t: self._live(t) for t in tenants if self._live(t)}

    def start_run(self, tenant: str, code: str | bytes, overrides: dict[str, Any]) -> Started:
        """A one-shot run up to its durable start record: the code prepared, the policy
        within the ceiling, a place in the live-sandbox quota, the analysis and the record."""
        text = prepare_code(code, self.config.max_code_bytes)
        policy = within(self.config.policy, overrides, self.config.ceiling)
        slot = self.oneshot(tenant)  # a one-shot run counts as a live sandbox while it runs
        slot.__enter__()
        try:
            findings = analyze(text)
            run_id = self.begin(tenant, None, "run", text, policy, findings, language="python")
        except BaseException as exc:
            slot.__exit__(type(exc), exc, exc.__traceback__)
            raise
        release = partial(slot.__exit__, None, None, None)
        return Started(run_id, tenant, "run", text, policy, findings, None, release)

    def carry_out(
        self,
        started: Started,
        envs: dict[str, str],
        on_event: EventCallback | None = None,
        timeout: float | None = None,
        *,
        context: str | None = None,
        language: str | None = None,
    ) -> Execution:
        """Run what `start_execute` or `start_run` recorded, record how it ended, and
        release its place (`timeout` can only lower a cell's; `context` or `language` say
        which code context of the sandbox runs it)."""
        try:
            return self._recorded(
                started.run_id,
                started.kind,
                lambda: self._now(started, envs, on_event, timeout, context, language),
            )
        finally:
            started.release()

    def _now(
        self,
        started: Started,
        envs: dict[str, str],
        on_event: EventCallback | None,
        timeout: float | None,
        context: str | None = None,
        language: str | None = None,
    ) -> Execution:
        if started.entry is not None:
            ex = started.entry.sandbox._run_prepared(
                started.code,
                timeout=timeout,
                envs=envs,
                on_event=on_event,
                findings=started.findings,
                run_id=started.run_id,
                context=context,
                language=language,
            )
        else:
            ex = run_prepared(
                started.code,
                started.policy,
                envs=envs,
                on_event=on_event,
                gate=Gate(self.approvals, tenant=started.tenant),
                findings=started.findings,
                run_id=started.run_id,
                defaults=self.config.policy,
            )
        self.finish(started.run_id, started.kind, ex)
        return ex

    def command(
        self, tenant: str, sandbox_id: str, cmd: str, timeout: float | None, envs: dict[str, str]
    ) -> CommandResult:
        with self.using(tenant, sandbox_id) as entry:
            return self._command(entry, tenant, sandbox_id, cmd, timeout, envs)

    def _command(
        self,
        entry: Entry,
        tenant: str,
        sandbox_id: str,
        cmd: str,
        timeout: float | None,
        envs: dict[str, str],
    ) -> CommandResult:
        run_id = self.begin(tenant, sandbox_id, "command", cmd, entry.sandbox.policy)

        def work() -> CommandResult:
            started = time.monotonic()
            result = entry.sandbox.commands.run(cmd, timeout=timeout, envs=envs)
            ex = Execution(
                duration_ms=(time.monotonic() - started) * 1000, exit_code=result.exit_code
            )
            ex.logs.stdout, ex.logs.stderr, ex.truncated = (
                [result.stdout],
                [result.stderr],
                result.truncated,
            )
            if result.killed_by:
                ex.killed_by = result.killed_by
                ex.limits_hit.append(result.killed_by)
            elif result.error:
                ex.limits_hit.append("timeout")
            self.finish(run_id, "command", ex)
            return result

        return self._recorded(run_id, "command", work)

    def code_context(
        self, tenant: str, sandbox_id: str, what: str, op: Callable[[Sandbox], T]
    ) -> T:
        """A code-context operation (create, list, restart, remove) with a place in the
        sandbox's queue and an audit record (kind "context", `what` as its code)."""
        with self.using(tenant, sandbox_id) as entry:
            run_id = self.begin(tenant, sandbox_id, "context", what, entry.sandbox.policy)

            def work() -> T:
                started = time.monotonic()
                result = op(entry.sandbox)
                ex = Execution(duration_ms=(time.monotonic() - started) * 1000)
                self.finish(run_id, "context", ex)
                return result

            return self._recorded(run_id, "context", work)

    # -- files: the small operations (uploads and downloads are recorded transfers, below) ---

    def _file_op(
        self, tenant: str, sandbox_id: str, kind: str, path: str, op: Callable[[Sandbox], T]
    ) -> T:
        """A file operation with a place in the sandbox's queue, recorded like every other
        operation (`kind` and the path; a failure too); a shutdown waits for it."""
        with self.using(tenant, sandbox_id) as entry:
            run_id = self.begin(tenant, sandbox_id, kind, path, entry.sandbox.policy)

            def work() -> T:
                started = time.monotonic()
                value = op(entry.sandbox)
                self.finish(
                    run_id, kind, Execution(duration_ms=(time.monotonic() - started) * 1000)
                )
                return value

            return self._recorded(run_id, kind, work)

    def file_call(
        self, tenant: str, sandbox_id: str, kind: str, subject: str, op: Callable[[Sandbox], T]
    ) -> T:
        """A file operation of another front end (E2B's Stat, MakeDir, Move, ...), recorded
        as a run of `kind` with `subject` (its paths) as its code."""
        return self._file_op(tenant, sandbox_id, kind, subject, op)

    def file_poll(self, tenant: str, sandbox_id: str, op: Callable[[Sandbox], T]) -> T:
        """A watcher's poll for its new events (E2B's WatchDir asks several times a
        second): a place in the sandbox's queue, not a row of the audit log each time (the
        watcher's start is one)."""
        with self.using(tenant, sandbox_id) as entry, self._operation():
            return op(entry.sandbox)

    def list_files(
        self, tenant: str, sandbox_id: str, path: str, depth: int = 1
    ) -> list[EntryInfo]:
        return self._file_op(
            tenant, sandbox_id, "file_list", path, lambda s: s.files.list(path, depth=depth)
        )

    def get_info(self, tenant: str, sandbox_id: str, path: str) -> EntryInfo:
        return self._file_op(
            tenant, sandbox_id, "file_stat", path, lambda s: s.files.get_info(path)
        )

    def rename(self, tenant: str, sandbox_id: str, source: str, destination: str) -> EntryInfo:
        return self._file_op(
            tenant,
            sandbox_id,
            "file_rename",
            f"{source} -> {destination}",
            lambda s: s.files.rename(source, destination),
        )

    # A directory watcher (E2B's and codecage's own API alike) lives on the sandbox's entry
    # as (handle, its directory's path, whether its events carry their entry).

    def watch_dir(
        self,
        tenant: str,
        sandbox_id: str,
        path: str,
        recursive: bool = False,
        include_entry: bool = False,
    ) -> str:
        """Start watching a directory (a `file_watch` row): the watcher's id. At most
        WATCHERS per sandbox (QuotaExceeded); they end with the sandbox, or `unwatch`."""

        def work(s: Sandbox) -> tuple[WatchHandle, str]:
            handle = s.files.watch_dir(path, recursive=recursive)
            return handle, s.files.get_info(path).path

        entry = self.get(tenant, sandbox_id)
        if len(entry.watchers) >= WATCHERS:
            raise QuotaExceeded(f"a sandbox has at most {WATCHERS} directory watchers")
        handle, root = self._file_op(tenant, sandbox_id, "file_watch", path, work)
        watcher_id = secrets.token_hex(12)
        entry.watchers[watcher_id] = (handle, root, include_entry)
        return watcher_id

    def watcher(self, tenant: str, sandbox_id: str, watcher_id: str) -> tuple[Any, str, bool]:
        """A watcher of the tenant's sandbox (WatcherNotFound if it has none by that id)."""
        found = self.get(tenant, sandbox_id).watchers.get(watcher_id)
        if found is None:
            raise WatcherNotFound(f"no watcher {watcher_id[:64]!r} in this sandbox")
        return found  # type: ignore[no-any-return]

    def watch_events(
        self, tenant: str, sandbox_id: str, watcher_id: str
    ) -> tuple[list[FilesystemEvent], bool]:
        """A watcher's events since the last call, and whether some were ever lost (its
        queue in the sandbox was full). A poll, not a row of the audit log."""
        handle = self.watcher(tenant, sandbox_id, watcher_id)[0]
        events = self.file_poll(tenant, sandbox_id, lambda s: handle.get_new_events())
        return events, bool(handle.overflowed)

    def unwatch(self, tenant: str, sandbox_id: str, watcher_id: str) -> None:
        """Stop a watcher (WatcherNotFound if it has none by that id)."""
        handle = self.watcher(tenant, sandbox_id, watcher_id)[0]
        self.get(tenant, sandbox_id).watchers.pop(watcher_id, None)
        with contextlib.suppress(SandboxError):  # gone with the kernel: stopped all the same
            self.file_poll(tenant, sandbox_id, lambda s: handle.stop())

    def exists(self, tenant: str, sandbox_id: str, path: str) -> bool:
        return self._file_op(
            tenant, sandbox_id, "file_exists", path, lambda s: s.files.exists(path)
        )

    def remove(self, tenant: str, sandbox_id: str, path: str) -> None:
        self._file_op(tenant, sandbox_id, "file_remove", path, lambda s: s.files.remove(path))

    def make_dir(self, tenant: str, sandbox_id: str, path: str) -> bool:
        return self._file_op(
            tenant, sandbox_id, "file_mkdir", path, lambda s: s.files.make_dir(path)
        )

    def upload(self, tenant: str, sandbox_id: str, path: str, data: bytes) -> EntryInfo:
        with self.uploading(tenant, sandbox_id, path) as sink:
            sink.write(data)
        assert sink.info is not None
        return sink.info

    @contextlib.contextmanager
    def uploading(self, tenant: str, sandbox_id: str, path: str) -> Iterator[Upload]:
        """An upload fed piece by piece (`write`); the host holds at most one FILE_CHUNK
        of it. Recorded, with the size and sha256 of what the host passed on."""
        with self.using(tenant, sandbox_id) as entry, self._transfer(entry):
            run_id = self.begin(tenant, sandbox_id, "file_upload", path, entry.sandbox.policy)
            sink = Upload(entry.sandbox, path)

            def work() -> None:
                sink.close()
                record = sink.record()
                self.finish(run_id, "file_upload", Execution(), files=[record])

            with self._operation():  # no context variable across the yield: threads differ
                try:
                    yield sink
                except BaseException as exc:
                    sink.abort()
                    self.fail(run_id, "file_upload", exc)
                    raise
            self._recorded(run_id, "file_upload", work)

    def download(self, tenant: str, sandbox_id: str, path: str) -> Generator[bytes, None, None]:
        """A file, chunk by chunk: the first chunk is fetched (and errors raised) when the
        caller first asks; the record is durable before the last chunk is handed out.
        Closing the iterator early records the transfer as failed."""
        with self.using(tenant, sandbox_id) as entry, self._transfer(entry):
            run_id = self.begin(tenant, sandbox_id, "file_download", path, entry.sandbox.policy)
            digest, size, recorded = hashlib.sha256(), 0, False
            with self._operation():  # no context variable across a yield: threads differ
                try:
                    chunks = entry.sandbox.files.chunks(path)
                    with operation(run_id=run_id):  # an approval is asked for here, if at all
                        held: bytes | None = next(chunks, b"")
                    while held is not None:
                        following = next(chunks, None)
                        digest.update(held)
                        size += len(held)
                        if following is None:  # durable before the last bytes go out
                            record = _file_record("download", path, size, digest.hexdigest())
                            self.finish(run_id, "file_download", Execution(), files=[record])
                            recorded = True
                        yield held
                        held = following
                except BaseException as exc:
                    if not recorded:
                        self.fail(run_id, "file_download", exc)
                    raise

    # -- background processes and ptys (never queued: they work while a cell runs) ----------

    def start_process(
        self,
        tenant: str,
        sandbox_id: str,
        cmd: str,
        args: list[str],
        *,
        envs: dict[str, str],
        cwd: str | None = None,
        tag: str | None = None,
        pty: PtySize | None = None,
        stdin: bool = False,
        user: str | None = None,
    ) -> int:
        """Start a process: admitted (runs per minute) and durably recorded first, the
        policy's approval for commands asked for, then its end recorded when it ends."""
        check_user(user)
        envs = check_envs(envs)
        entry = self.get(tenant, sandbox_id)
        sandbox = entry.sandbox
        code = shlex.join([cmd, *args])
        run_id = self.begin(tenant, sandbox_id, "process", code, sandbox.policy)

        def work() -> int:
            sandbox._gate_command(code, envs)
            return start_process(
                sandbox, cmd, args, envs=envs, cwd=cwd, tag=tag, pty=pty, stdin=stdin
            )

        pid = self._recorded(run_id, "process", work)
        self.process_records.add(run_id, sandbox, pid)
        if sandbox.proc_observer is None:  # what is sent to its processes, for their records
            sandbox.proc_observer = partial(self.process_records.observe, sandbox.id)
        return pid

    def on_process(self, tenant: str, sandbox_id: str, op: Callable[[Sandbox], T]) -> T:
        """An operation on the tenant's sandbox's processes (read, list, input, signal,
        resize): no place in its queue, so it never waits for a cell; a shutdown waits."""
        entry = self.get(tenant, sandbox_id)
        with self._operation():
            return op(entry.sandbox)


class Upload:
    """The sandbox end of an upload: bytes are passed on in FILE_CHUNK pieces."""

    def __init__(self, sandbox: Sandbox, path: str) -> None:
        self._sandbox, self._path = sandbox, path
        self._held = bytearray()
        self._digest, self._size, self._sent = hashlib.sha256(), 0, False
        self.info: EntryInfo | None = None
        self.deadline = time.monotonic() + (sandbox.policy.timeout_s or 600)  # the whole upload

    def write(self, data: bytes) -> None:
        self._digest.update(data)
        self._size += len(data)
        self._held += data
        while len(self._held) >= FILE_CHUNK:
            self._send(bytes(self._held[:FILE_CHUNK]))
            del self._held[:FILE_CHUNK]

    def _send(self, chunk: bytes) -> None:
        self.info = self._sandbox.files._write_chunk(self._path, chunk, append=self._sent)
        self._sent = True

    def abort(self) -> None:
        """An upload that failed midway (body too large, client gone, malformed) leaves no
        partial file behind."""
        self._held.clear()
        if self._sent:
            with contextlib.suppress(SandboxError):
                self._sandbox.files.remove(self._path)

    def close(self) -> None:
        if self._held or not self._sent:
            self._send(bytes(self._held))
            self._held.clear()

    def record(self) -> dict[str, Any]:
        return _file_record("upload", self._path, self._size, self._digest.hexdigest())


def _images(ex: Execution) -> list[tuple[str, bytes]]:
    """The PNG and JPEG results of a run as the sandbox declared them (what the bytes really
    are is checked by whoever shows them: the console)."""
    found = []
    for result in ex.results:
        for mime, encoded in (("image/png", result.png), ("image/jpeg", result.jpeg)):
            if isinstance(encoded, str):
                with contextlib.suppress(ValueError):
                    found.append((mime, base64.b64decode(encoded, validate=True)))
    return found


def _file_record(direction: str, path: str, size: int, sha256: str) -> dict[str, Any]:
    """As the host saw the bytes, not as the sandbox described them."""
    return {"direction": direction, "path": path, "size": size, "sha256": sha256}
