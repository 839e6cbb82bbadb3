"""Shared fixtures. Every test is followed by a leak check: no sandbox process, cgroup or
host mount may outlive the test that started it."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import codecage
import codecage._jail
from codecage._cluster import postgres
from codecage._jail import cgroups
from codecage._jail.namespace import UID_BASE

from . import engine
from .openapi_check import validate

# The unit layer (tests/unit) is its own rootdir and runs in `make check`, not here.
collect_ignore = ["unit"]

# The conformance kit: tests using the `backend` fixture run once per backend of this host.
pytest_plugins = ["codecage.testing.pytest_plugin", "tests.e2b_server"]  # + E2B's fixtures


def pytest_configure(config: pytest.Config) -> None:
    engine.start()  # the container backend's engine, before the kit lists the backends


def pytest_unconfigure(config: pytest.Config) -> None:
    engine.stop()


# CI's budget (every backend but the default starts its sandboxes in seconds, not ms):
# - a conformance test that has other parameters besides the backend (seven denied
#   syscalls, four output floods, three filesystems, ...) runs every case on the default
#   backend, and one case on each of the other backends (a different one on each, so the
#   three together cover more of them);
# - a conformance test that is not an attack test (marked `every_backend`: the jail kit,
#   the hostile kernel, pause) runs on the default backend and on one other backend, a
#   different one for each test (by the test's name), so each backend runs a share.
# CODECAGE_FULL_MATRIX=1 (`make test-full`, `make test-slow`) runs every case on every
# backend, the full-VM level included (VM_SUBSET).
FULL_MATRIX = os.environ.get("CODECAGE_FULL_MATRIX") == "1"


def _backend(item: pytest.Item) -> str | None:
    """The backend a conformance test's item runs on (None: not a conformance test)."""
    spec = getattr(item, "callspec", None)
    return spec.params.get("backend") if spec is not None else None


def _name(item: pytest.Item) -> str:
    return str(getattr(item, "originalname", item.name))


def _split(
    items: list[pytest.Item], dropped: set[int]
) -> tuple[list[pytest.Item], list[pytest.Item]]:
    return (
        [item for item in items if id(item) not in dropped],
        [item for item in items if id(item) in dropped],
    )


def _one_case_per_backend(items: list[pytest.Item]) -> tuple[list[pytest.Item], list[pytest.Item]]:
    from codecage.testing import DEFAULT

    cases: dict[tuple[str, str, str], list[pytest.Item]] = {}
    for item in items:
        backend, spec = _backend(item), getattr(item, "callspec", None)
        # `make` (tests/test_sandbox.py: local or remote) is a fixture's, not a case
        cases_of = {k for k in spec.params if k not in ("backend", "make")} if spec else ()
        if backend and backend != DEFAULT and cases_of:
            kind = f"{_name(item)}/{spec.params.get('make', '')}"
            cases.setdefault((str(item.path), kind, backend), []).append(item)
    order = sorted({key[2] for key in cases})
    dropped: set[int] = set()
    for (_, _, backend), group in cases.items():
        keep = group[order.index(backend) % len(group)]
        dropped.update(id(item) for item in group if item is not keep)
    return _split(items, dropped)


def _one_other_backend(items: list[pytest.Item]) -> tuple[list[pytest.Item], list[pytest.Item]]:
    from codecage.testing import DEFAULT

    def other(item: pytest.Item) -> str | None:
        backend = _backend(item)
        every = item.get_closest_marker("every_backend")
        return backend if backend and backend != DEFAULT and not every else None

    others: dict[tuple[str, str], set[str]] = {}
    for item in items:
        if (backend := other(item)) is not None:
            others.setdefault((str(item.path), _name(item)), set()).add(backend)
    chosen = {
        key: sorted(names)[zlib.crc32(key[1].encode()) % len(names)]
        for key, names in others.items()
    }
    dropped = {
        id(item)
        for item in items
        if (backend := other(item)) is not None and backend != chosen[(str(item.path), _name(item))]
    }
    return _split(items, dropped)


# The full-VM level boots a whole guest per sandbox (~20 s under TCG): outside
# `make test-slow` (CODECAGE_FULL_MATRIX=1) it runs this representative subset of the
# conformance kit (the boundary: a host file, the network, the memory limit) and its own
# module, tests/test_vm.py, which covers every limit outcome on one guest.
VM_SUBSET = frozenset(
    {
        "test_read_canary_in_host_home",
        "test_network_is_cut_off",
        "test_memory_bomb_ends_the_kernel_and_the_next_run_works",
    }
)


def _vm_subset(items: list[pytest.Item]) -> tuple[list[pytest.Item], list[pytest.Item]]:
    dropped = {
        id(item) for item in items if _backend(item) == "vm" and _name(item) not in VM_SUBSET
    }
    return _split(items, dropped)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not FULL_MATRIX:
        items[:], slow = _vm_subset(items)
        items[:], deselected = _one_case_per_backend(items)
        items[:], others = _one_other_backend(items)
        if slow or deselected or others:
            config.hook.pytest_deselected(items=slow + deselected + others)
    if os.geteuid() != 0:
        for item in items:
            if item.get_closest_marker("requires_root"):
                item.add_marker(pytest.mark.skip(reason="needs root"))


# The owner in a sandbox's cgroup path: codecage's own tree, or a container engine's.
_OWNER = re.compile(r"/codecage(?:-engine)?/(\d+-\d+-\d+)-")


def _uid_and_parent(pid: int) -> tuple[int, int] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    return int(fields["Uid"].split()[1]), int(fields["PPid"])


def held_by(pid: int) -> int | None:
    """The nearest ancestor that is a host process (not a sandbox uid, not PID 1): who holds
    a process that is in no sandbox cgroup (bwrap's, before the host moves it into its
    cgroups). None if it has none: it escaped, and PID 1 or a subreaper took it in."""
    for _ in range(64):
        found = _uid_and_parent(pid)
        if found is None or found[1] <= 1:
            return None
        pid = found[1]
        parent = _uid_and_parent(pid)
        if parent is not None and parent[0] < UID_BASE:
            return pid
    return None


def descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        found = _uid_and_parent(pid)
        if found is None or found[1] <= 1:
            return False
        if found[1] == ancestor:
            return True
        pid = found[1]
    return False


def sandbox_processes(owner: str | None = None) -> list[str]:
    """Host processes running as a sandbox uid (every sandbox gets one >= UID_BASE) that
    belong to `owner` (default: this process), or to no one at all (escaped). Sandboxes of
    other processes (a parallel run, another pytest-xdist worker) are not this test's
    business: a process is theirs by its cgroup path, or, in none yet, by its ancestry."""
    mine = owner is None or owner == cgroups.owner_name()
    owner = owner or cgroups.owner_name()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            membership = (entry / "cgroup").read_text()
        except OSError:
            continue
        uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
        if uid < UID_BASE:
            continue
        match = _OWNER.search(membership)
        if match is not None:
            if match.group(1) != owner:
                continue  # another owner's sandbox
        elif held_by(int(entry.name)) is not None and not (
            mine and descends_from(int(entry.name), os.getpid())
        ):
            continue  # being set up by another live process: its own check sees it
        found.append(f"{entry.name}: {status.splitlines()[0]} {membership.split()[0]}")
    return found


def sandbox_cgroups() -> list[str]:
    owner = cgroups.owner_name()
    out = []
    for controller in cgroups.V1_CONTROLLERS:
        for jail_dir in (cgroups.ROOT / controller / "codecage").glob(f"{owner}-*"):
            out += [str(p) for p in jail_dir.iterdir() if p.is_dir()]
    return out


# Mounts that another session's work brings and takes away (a parallel run's containers,
# another pytest-xdist worker's temporary directories): not this test's.
_WORKER = re.escape(os.environ.get("PYTEST_XDIST_WORKER", "gw-none")[2:])
_OTHERS_MOUNTS = re.compile(
    rf"^(/var/lib/containers/storage/|/tmp/pytest-of-[^/]+/pytest-\d+/popen-gw(?!{_WORKER}/)"
    # another worker's bwrap sandboxes' volumes, staged for a moment (docs/volumes.md)
    rf"|/run/codecage/bwrap-volumes/(?!{os.getpid()}-))"
)


def host_mounts() -> set[str]:
    mounts = {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return mounts
    return {m for m in mounts if not _OTHERS_MOUNTS.match(m)}


@pytest.fixture(autouse=True)
def leak_check() -> Iterator[None]:
    """What this test started must be gone when it ends (processes, cgroups, mounts).
    Processes that were there before it (e.g. a crashed run's, swept and awaiting their
    reaper) are not its leaks; exiting ones get a moment to be reaped. Neither are cgroups
    that were there before it: a module's sandbox shared by its tests (tests/test_vm.py's
    guest), whose fixture checks its own end."""
    mounts_before = host_mounts()
    processes_before = {p.split(":")[0] for p in sandbox_processes()}
    cgroups_before = set(sandbox_cgroups())
    yield
    deadline = time.monotonic() + 3
    while True:
        leaks = [p for p in sandbox_processes() if p.split(":")[0] not in processes_before]
        leaks += [c for c in sandbox_cgroups() if c not in cgroups_before]
        leaks += [f"mount {m}" for m in host_mounts() - mounts_before]
        if not leaks or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaks, f"left behind by this test: {leaks}"


# -- a real service on loopback ---------------------------------------------------------------


@dataclass
class Service:
    url: str
    db: Path | str  # an SQLite file, or a PostgreSQL URL
    keys: dict[str, str]
    process: subprocess.Popen[bytes]
    config: Path | None = None

    def client(self, tenant: str = "alice") -> codecage.Client:
        """A client whose every response is checked against docs/openapi.json."""
        client = codecage.connect(self.url, self.keys[tenant])
        client._http.event_hooks["response"].append(validate)
        return client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "codecage", *args], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def start_service(
    db: Path | str,
    tenants: tuple[str, ...] = ("alice", "bob"),
    config: Path | None = None,
    env: dict[str, str] | None = None,
    log_file: Path | None = None,
) -> Service:
    """A real `codecage serve` on loopback; its stderr goes to `log_file` (default: beside
    an SQLite `db`)."""
    keys = {t: cli("keys", "create", "--tenant", t, "--db", str(db)) for t in tenants}
    port = free_port()
    extra = ["--config", str(config)] if config else []
    if log_file is None:
        assert isinstance(db, Path), "a service on PostgreSQL needs a log_file"
        log_file = db.with_suffix(".log")
    with open(log_file, "ab") as log:  # a file, not a pipe nobody reads
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "codecage",
                "serve",
                "--db",
                str(db),
                "--port",
                str(port),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=None if env is None else {**os.environ, **env},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return Service(url, db, keys, process, config)
        except httpx.HTTPError:
            time.sleep(0.1)
        if process.poll() is not None:
            break
    process.kill()
    process.wait()
    raise RuntimeError(f"the service did not start: {log_file.read_text()[-2000:]}")


def stop_service(service: Service) -> None:
    stop_process(service.process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, 30 s to end, then SIGKILL."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    where = tmp_path_factory.mktemp("service")
    config = where / "service.toml"  # room for the many-sessions test; quotas have their own
    config.write_text(  # the default ceiling, with a pids_max that fits 250 sandboxes
        "[quotas]\nlive_sandboxes = 250\nruns_per_minute = 100000\n"
        "[ceiling]\nmemory_mb = 4096\ncpu_cores = 2.0\ncpu_s = 3600\npids_max = 64\n"
        "disk_mb = 4096\ntmp_mb = 1024\nshm_mb = 1024\ntimeout_s = 600\n"
        "idle_timeout_s = 3600\noutput_bytes = 16777216\n"
    )
    svc = start_service(where / "audit.db", ("alice", "bob", "fuzz"), config)
    try:
        yield svc
    finally:
        stop_service(svc)


# -- a real PostgreSQL on loopback -------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.Server]:
    """One PostgreSQL server per test process (`make backends` installs it; where it is
    not installed, its tests skip, saying so)."""
    try:
        postgres.binaries()
    except codecage.BackendUnavailable as exc:
        pytest.skip(str(exc))
    where = Path(tempfile.mkdtemp(prefix="codecage-pg-"))  # not under pytest's 0700 tmp
    try:
        yield postgres.start(where)
    finally:
        postgres.stop(where)
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: postgres.Server) -> Iterator[str]:
    """A database of this test's own on the session's server."""
    name = f"t_{secrets.token_hex(6)}"
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        postgres_server.drop_database(name)


# -- a real Ray cluster on loopback (tests/cluster_kit.py) ------------------------------------


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    """One cluster per test process: a Ray head, two sandbox nodes, a PostgreSQL, two front
    ends (Ray and PostgreSQL come with `make`; where they are missing, the tests skip)."""
    pytest.importorskip("ray", reason="Ray is not installed (make installs it)")
    from codecage._cluster import local

    from .cluster_kit import running_cluster

    try:
        postgres.binaries()
        local.ray_bin()
    except codecage.BackendUnavailable as exc:
        pytest.skip(str(exc))
    with running_cluster() as running:
        yield running


@pytest.fixture
def alice(service: Service) -> Iterator[codecage.Client]:
    """A client of tenant alice; after the test, alice must have no sandbox left."""
    with service.client("alice") as client:
        yield client
        left = client.request("GET", "/v1/sandboxes").json()
        for sandbox in left:
            client.request("DELETE", f"/v1/sandboxes/{sandbox['id']}")
        assert left == [], f"sandboxes left on the service: {left}"
