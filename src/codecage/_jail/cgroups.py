"""Host-side cgroups of a sandbox: limits, the host's own readings, killing, removal.

Layout: <controller>/codecage/<owner>/<sandbox>, where <owner> names the process that
created it (pid, start time and PID namespace: unique among live processes, in every
container on the host). The owner holds a lock on its directory for as long as it lives, so
a start-up sweep tells leftovers of a dead process from the live sandboxes of another one by
the lock, never by a pid in its own /proc (processes that share a cgroup tree but not a PID
namespace, such as pods on one node, would otherwise sweep each other's live sandboxes).
cgroup v1 (memory, pids, cpu, cpuacct, freezer) as on this machine; cgroup v2 where the
host's unified hierarchy has controllers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path

from .._errors import BackendUnavailable
from .._policy import Policy

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")
CPU_PERIOD_US = 100_000


def _read(path: Path) -> str:
    return path.read_text()


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _keyed(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def detect_version() -> int | None:
    """2 if the unified hierarchy has our controllers, 1 if the v1 ones are mounted, else None."""
    for base in (ROOT, ROOT / "unified"):
        controllers = base / "cgroup.controllers"
        if controllers.exists():
            have = set(controllers.read_text().split())
            if {"memory", "pids", "cpu"} <= have:
                return 2
    if all((ROOT / c / "cgroup.procs").exists() for c in V1_CONTROLLERS):
        return 1
    return None


def owner_name(pid: int | None = None) -> str:
    """`<pid>-<start time>-<PID namespace>` of this process (or of `pid`): a pid and its start
    time alone repeat across PID namespaces (containers started at the same moment)."""
    proc = Path(f"/proc/{pid or 'self'}")
    start = _read(proc / "stat").rsplit(")", 1)[1].split()[19]
    namespace = os.stat(proc / "ns" / "pid").st_ino
    return f"{pid or os.getpid()}-{start}-{namespace}"


# owner -> the descriptor of its locked directory, and how many jails of this process claim
# it (the gvisor and container backends name one owner per process, shared by their jails)
_claims: dict[str, list[int]] = {}
_claims_lock = threading.Lock()


def claim_owner(version: int, owner: str) -> None:
    """Create the owner's directory and hold a lock on it while this process lives (the
    descriptor is close-on-exec: no program this process starts keeps it). What tells every
    process that shares this cgroup tree, whatever its PID namespace, that the owner's
    sandboxes are live; a sweep gets the lock only from an owner that is gone."""
    with _claims_lock:
        if owner in _claims:
            _claims[owner][1] += 1
            return
        path = _owner_lock_dir(version, owner)
        while True:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # a sweep may have removed the directory between the mkdir and the lock
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                _claims[owner] = [fd, 1]
                return
            os.close(fd)


def _release_owner(owner: str) -> bool:
    """Give up one claim on `owner`; True once none is left (the lock is released)."""
    with _claims_lock:
        claim = _claims.get(owner)
        if claim is None:
            return True
        claim[1] -= 1
        if claim[1] > 0:
            return False
        del _claims[owner]
    os.close(claim[0])
    return True


def _owner_lock_dir(version: int, owner: str) -> Path:
    return _bases(version)[0] / owner


@dataclass
class Usage:
    memory_peak_bytes: int | None  # None where it cannot be read (rootless)
    oom_kills: int
    pids_max_events: int
    cpu_s: float
    # on the sandbox's volumes' devices (only where I/O caps are set): read and written
    # bytes and I/Os, for `limits_hit` (docs/volumes.md, "Disk I/O limits")
    io: tuple[int, int, int, int] = (0, 0, 0, 0)


IO_FIELDS = (
    "volume_read_bytes_per_s",
    "volume_write_bytes_per_s",
    "volume_read_iops",
    "volume_write_iops",
)


def io_limited(policy: Policy) -> bool:
    return any(getattr(policy, name) is not None for name in IO_FIELDS)


def io_throttled(policy: Policy, before: Usage, after: Usage, seconds: float) -> bool:
    """Whether a run's I/O on its volumes went at 80% or more of a cap, on average over
    the run: the sign of throttling (neither blkio nor io.max counts throttled I/Os).
    Runs shorter than 0.2 s are not judged: a burst at their start is allowed."""
    if seconds < 0.2:
        return False
    caps = [getattr(policy, name) for name in IO_FIELDS]
    done = [a - b for a, b in zip(after.io, before.io, strict=True)]
    return any(
        cap is not None and n / seconds >= 0.8 * cap for cap, n in zip(caps, done, strict=True)
    )


def io_unavailable(version: int) -> str | None:
    """Why this host cannot cap a sandbox's disk I/O (blkio throttling on v1, io.max on
    v2), None if it can."""
    if version == 1:
        if not (ROOT / "blkio" / "blkio.throttle.read_bps_device").exists():
            return "the cgroup v1 blkio controller (with throttling) is not mounted"
        return None
    base = ROOT if (ROOT / "cgroup.controllers").exists() else ROOT / "unified"
    if "io" not in (base / "cgroup.controllers").read_text().split():
        return "the cgroup v2 io controller is not available"
    return None


class SandboxCgroups:
    """The cgroups of one sandbox (v1: one directory per controller)."""

    def __init__(self, version: int, sandbox_id: str, owner: str) -> None:
        self.version = version
        self._fds: dict[str, int] = {}
        self.io_devices: list[str] = []  # major:minor of the volumes I/O caps apply to
        if version == 1:
            self.dirs = {c: ROOT / c / "codecage" / owner / sandbox_id for c in V1_CONTROLLERS}
            blkio = ROOT / "blkio" / "codecage" / owner / sandbox_id
            if blkio.exists():  # a sweep's: removed with the rest
                self.dirs["blkio"] = blkio
        else:
            base = ROOT if (ROOT / "cgroup.controllers").exists() else ROOT / "unified"
            self.dirs = {"unified": base / "codecage" / owner / sandbox_id}

    @property
    def mount_names(self) -> list[str]:
        """Controllers to show read-only inside the sandbox."""
        return ["memory", "pids", "cpu"] if self.version == 1 else ["unified"]

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def create(self, policy: Policy) -> None:
        if self.version == 1 and io_limited(policy):
            self.dirs["blkio"] = ROOT / "blkio" / self.dirs["pids"].relative_to(ROOT / "pids")
        if self.version == 2:
            _enable_v2_controllers(next(iter(self.dirs.values())), io=io_limited(policy))
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        try:
            self._limit(policy)
        except OSError:
            self.remove()
            raise

    def _limit(self, policy: Policy) -> None:
        d = self.dirs
        if self.version == 1:
            if policy.memory_mb is not None:
                _write(d["memory"] / "memory.limit_in_bytes", str(policy.memory_mb << 20))
                with contextlib.suppress(FileNotFoundError):  # without swap accounting
                    _write(d["memory"] / "memory.memsw.limit_in_bytes", str(policy.memory_mb << 20))
            _write(
                d["pids"] / "pids.max", "max" if policy.pids_max is None else str(policy.pids_max)
            )
            if policy.cpu_cores is not None:
                _write(d["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(d["cpu"] / "cpu.cfs_quota_us", str(int(policy.cpu_cores * CPU_PERIOD_US)))
        else:
            u = d["unified"]
            if policy.memory_mb is not None:
                _write(u / "memory.max", str(policy.memory_mb << 20))
                with contextlib.suppress(FileNotFoundError):
                    _write(u / "memory.swap.max", "0")
            _write(u / "pids.max", "max" if policy.pids_max is None else str(policy.pids_max))
            if policy.cpu_cores is not None:
                _write(u / "cpu.max", f"{int(policy.cpu_cores * CPU_PERIOD_US)} {CPU_PERIOD_US}")

    def limit_io(self, device: str, policy: Policy) -> None:
        """Cap the sandbox's I/O on one volume's device (`major:minor`), as the policy says."""
        rbps, wbps = policy.volume_read_bytes_per_s, policy.volume_write_bytes_per_s
        riops, wiops = policy.volume_read_iops, policy.volume_write_iops
        if self.version == 1:
            d = self.dirs["blkio"]
            for name, value in (
                ("read_bps_device", rbps),
                ("write_bps_device", wbps),
                ("read_iops_device", riops),
                ("write_iops_device", wiops),
            ):
                if value is not None:
                    _write(d / f"blkio.throttle.{name}", f"{device} {value}")
        else:
            caps = {"rbps": rbps, "wbps": wbps, "riops": riops, "wiops": wiops}
            text = " ".join(f"{k}={v}" for k, v in caps.items() if v is not None)
            _write(self.dirs["unified"] / "io.max", f"{device} {text}")
        self.io_devices.append(device)

    def _io(self) -> tuple[int, int, int, int]:
        """Bytes read, written, and I/Os read, written, on the capped volumes' devices."""
        if not self.io_devices:
            return (0, 0, 0, 0)
        totals = [0, 0, 0, 0]
        if self.version == 1:
            for slot, name in ((0, "io_service_bytes"), (2, "io_serviced")):
                for line in self._get("blkio", f"blkio.throttle.{name}").splitlines():
                    parts = line.split()
                    if len(parts) == 3 and parts[0] in self.io_devices:
                        if parts[1] == "Read":
                            totals[slot] += int(parts[2])
                        elif parts[1] == "Write":
                            totals[slot + 1] += int(parts[2])
        else:
            for line in self._get("unified", "io.stat").splitlines():
                device, *fields = line.split()
                if device in self.io_devices:
                    stat = dict(f.split("=", 1) for f in fields if "=" in f)
                    for slot, key in enumerate(("rbytes", "wbytes", "rios", "wios")):
                        totals[slot] += int(stat.get(key, 0))
        return (totals[0], totals[1], totals[2], totals[3])

    def _file(self, controller: str, name: str) -> int:
        """A descriptor kept open on a cgroup file: re-read with pread, no path walk per run."""
        key = f"{controller}/{name}"
        fd = self._fds.get(key)
        if fd is None:
            fd = os.open(self.dirs[controller] / name, os.O_RDWR | os.O_CLOEXEC)
            self._fds[key] = fd
        return fd

    def _get(self, controller: str, name: str) -> str:
        return os.pread(self._file(controller, name), 4096, 0).decode()

    def usage(self) -> Usage:
        if self.version == 1:
            return Usage(
                memory_peak_bytes=int(self._get("memory", "memory.max_usage_in_bytes")),
                oom_kills=_keyed(self._get("memory", "memory.oom_control")).get("oom_kill", 0),
                pids_max_events=_keyed(self._get("pids", "pids.events")).get("max", 0),
                cpu_s=int(self._get("cpuacct", "cpuacct.usage")) / 1e9,
                io=self._io(),
            )
        peak = (
            "memory.peak" if (self.dirs["unified"] / "memory.peak").exists() else "memory.current"
        )
        return Usage(
            memory_peak_bytes=int(self._get("unified", peak)),
            oom_kills=_keyed(self._get("unified", "memory.events")).get("oom_kill", 0),
            pids_max_events=_keyed(self._get("unified", "pids.events")).get("max", 0),
            cpu_s=_keyed(self._get("unified", "cpu.stat")).get("usage_usec", 0) / 1e6,
            io=self._io(),
        )

    def memory_current(self) -> int:
        if self.version == 1:
            return int(self._get("memory", "memory.usage_in_bytes"))
        return int(self._get("unified", "memory.current"))

    def reset_peak(self) -> None:
        if self.version == 1:
            os.pwrite(self._file("memory", "memory.max_usage_in_bytes"), b"0", 0)
        else:
            with contextlib.suppress(OSError):  # resettable since Linux 6.12
                os.pwrite(self._file("unified", "memory.peak"), b"0", 0)

    def close_files(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def pids(self) -> list[int]:
        path = self.dirs["pids" if self.version == 1 else "unified"] / "cgroup.procs"
        try:
            return [int(p) for p in _read(path).split()]
        except FileNotFoundError:
            return []

    def kill(self, spare: int | Container[int] | None = None, sig: int = signal.SIGKILL) -> None:
        """Signal every process of the sandbox but `spare` (one pid or several).

        Never through the freezer: a host killed between a freeze and its thaw would leave
        the sandbox frozen, its init unable to see that the host is gone, alive for ever.
        Each process is signalled through a pidfd, checked to be in this cgroup after the
        pidfd pins it (so a reused pid is never signalled), and the cgroup is listed again
        until it holds nothing not yet signalled (children forked meanwhile included). A
        whole sandbox's end also SIGKILLs its init, which takes its PID namespace with it."""
        keep: Container[int] = {spare} if isinstance(spare, int) else (spare or ())
        if self.version == 2 and spare is None and sig == signal.SIGKILL:
            kill_file = self.dirs["unified"] / "cgroup.kill"
            if kill_file.exists():
                _write(kill_file, "1")
                return
        signalled: set[tuple[int, str]] = set()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            fresh = [pid for pid in self.pids() if pid not in keep]
            _test_pause()
            if not any([self._signal(pid, sig, signalled) for pid in fresh]):
                return  # nothing listed that was not signalled already

    def _signal(self, pid: int, sig: int, signalled: set[tuple[int, str]]) -> bool:
        """Signal `pid` if it is still this cgroup's and not signalled yet; True if it was."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return False
        try:
            identity = self._member(pid)  # read after the pidfd pins the process
            if identity is None or identity in signalled:
                return False
            signal.pidfd_send_signal(pidfd, sig)  # only ever the pinned process
            signalled.add(identity)
            return True
        except (OSError, IndexError, ValueError):
            return False
        finally:
            os.close(pidfd)

    def _member(self, pid: int) -> tuple[int, str] | None:
        """(pid, start time) if `pid` is in this sandbox's cgroup, else None."""
        if self.version == 1:
            controller, own = "pids", self.dirs["pids"].relative_to(ROOT / "pids")
        else:
            controller, own = "", self.dirs["unified"].relative_to(self.dirs["unified"].parents[2])
        for line in _read(Path(f"/proc/{pid}/cgroup")).splitlines():
            _, names, path = line.split(":", 2)
            ours = controller in names.split(",") if controller else names == ""
            if ours and path == f"/{own}":
                start = _read(Path(f"/proc/{pid}/stat")).rsplit(")", 1)[1].split()[19]
                return pid, start
        return None

    def freeze(self, timeout_s: float = 5.0, abort: Callable[[], bool] = lambda: False) -> None:
        """Stop every process of the sandbox where it is (the freezer): nothing runs, memory
        stays charged. Waits until the kernel reports the cgroup frozen; if it does not
        within `timeout_s` (a task stuck in the kernel), or `abort()` says the sandbox is
        being ended meanwhile, thaws it again and raises OSError."""
        if self.version == 1:
            _write(self.dirs["freezer"] / "freezer.state", "FROZEN")
        else:
            _write(self.dirs["unified"] / "cgroup.freeze", "1")
        deadline = time.monotonic() + timeout_s
        while not self.frozen():
            if abort():
                self._thaw()
                raise OSError("the sandbox was ended while it was being frozen")
            if time.monotonic() > deadline:
                self.thaw()
                raise OSError(f"the sandbox's cgroup did not freeze within {timeout_s} s")
            time.sleep(0.001)

    def frozen(self) -> bool:
        """Whether the kernel reports every process of the sandbox frozen."""
        if self.version == 1:
            return _read(self.dirs["freezer"] / "freezer.state").strip() == "FROZEN"
        return _keyed(_read(self.dirs["unified"] / "cgroup.events")).get("frozen") == 1

    def thaw(self) -> None:
        """Let the sandbox's processes run again (the freeze's undoing)."""
        if self.version == 1:
            _write(self.dirs["freezer"] / "freezer.state", "THAWED")
        else:
            _write(self.dirs["unified"] / "cgroup.freeze", "0")

    def _thaw(self) -> None:
        """Thaw the cgroup, whatever froze it (an older codecage, an operator): a frozen
        process cannot die of SIGKILL under cgroup v1, nor its init notice the host gone."""
        with contextlib.suppress(OSError):
            if self.version == 1:
                _write(self.dirs["freezer"] / "freezer.state", "THAWED")
            else:
                _write(self.dirs["unified"] / "cgroup.freeze", "0")

    def remove(self, timeout_s: float = 5.0) -> None:
        """Kill what is left and remove the directories (a cgroup with tasks cannot be removed)."""
        self.close_files()
        self._thaw()
        deadline = time.monotonic() + timeout_s
        for d in self.dirs.values():
            while d.exists():
                try:
                    d.rmdir()
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    with contextlib.suppress(OSError):
                        self.kill()
                    time.sleep(0.002)


def _test_pause() -> None:
    """Tests only (CODECAGE_TEST_PAUSE_IN_KILL=<file>): stop in the middle of a kill (the
    cgroup listed, nothing signalled yet), after creating the file, so a test can kill the
    host at exactly that moment."""
    marker = os.environ.get("CODECAGE_TEST_PAUSE_IN_KILL")
    if marker:
        Path(marker).touch()
        time.sleep(3600)


def _enable_v2_controllers(leaf: Path, io: bool = False) -> None:
    """Enable memory, pids and cpu (and io) for children along the path from the root to
    `leaf`. Where they cannot be (inside a container whose cgroup was not delegated, or
    whose processes still sit in its root cgroup), a clear error, never sandboxes without
    limits."""
    wanted = ["memory", "pids", "cpu", *(["io"] if io else [])]
    base = leaf.parents[2]
    for parent in (base.parent, base, leaf.parent.parent, leaf.parent):
        parent.mkdir(exist_ok=True)
        control = parent / "cgroup.subtree_control"
        error = None
        try:
            _write(control, " ".join(f"+{c}" for c in wanted))
        except OSError as exc:
            error = exc
        try:
            enabled = {c.lstrip("+") for c in _read(control).split()}
        except OSError:
            enabled = set()
        missing = [c for c in wanted if c not in enabled]
        if missing:
            why = f" ({error.strerror or error})" if error is not None else ""
            raise BackendUnavailable(
                f"cgroup v2: cannot enable {', '.join(missing)} for the sandboxes in "
                f"{parent}{why}. In a container, its cgroup must be delegated to it "
                "(writable, with these controllers), and no process may stay in the "
                "cgroup whose children get controllers (cgroup v2's no-internal-process "
                "rule): move this process into a child cgroup first, e.g. "
                "`mkdir /sys/fs/cgroup/init && echo $$ > /sys/fs/cgroup/init/cgroup.procs`"
            )


def sweep(version: int, keep_owner: str) -> int:
    """Remove the cgroups of owners that are no longer alive. Returns how many were removed."""
    removed = 0
    bases = _bases(version)
    owners = {p.name for b in bases if b.exists() for p in b.iterdir() if p.is_dir()}
    for owner in owners:
        if owner == keep_owner or owner_alive(owner, version):
            continue
        sandboxes = {
            s.name
            for b in bases
            if (b / owner).exists()
            for s in (b / owner).iterdir()
            if s.is_dir()
        }
        for sid in sandboxes:
            SandboxCgroups(version, sid, owner).remove()
            removed += 1
        for b in bases:
            with contextlib.suppress(OSError):
                (b / owner).rmdir()
    return removed


def cap_owner(version: int, owner: str, total_mb: int, total_pids: int | None = None) -> None:
    """One parent cgroup over all of this process's sandboxes, capping their total memory
    and processes: a thousand sandboxes each within its own limits can still not take the
    host's memory or every pid (`total_pids`: default `default_total_pids()`)."""
    pids = default_total_pids() if total_pids is None else total_pids
    if version == 1:
        parent = ROOT / "memory" / "codecage" / owner
        parent.mkdir(parents=True, exist_ok=True)
        _write(parent / "memory.limit_in_bytes", str(total_mb << 20))
        parent = ROOT / "pids" / "codecage" / owner
        parent.mkdir(parents=True, exist_ok=True)
        _write(parent / "pids.max", str(pids))
    else:
        base = _bases(2)[0] / owner
        base.mkdir(parents=True, exist_ok=True)
        _enable_v2_controllers(base / "x")
        _write(base / "memory.max", str(total_mb << 20))
        _write(base / "pids.max", str(pids))


def default_total_pids() -> int:
    """Processes (and threads) of all sandboxes together: CODECAGE_TOTAL_PIDS, else half of
    what the host allows (the smaller of kernel.pid_max and kernel.threads-max)."""
    configured = int(os.environ.get("CODECAGE_TOTAL_PIDS", 0) or 0)
    if configured > 0:
        return configured
    limits = []
    for name in ("pid_max", "threads-max"):
        with contextlib.suppress(OSError, ValueError):
            limits.append(int(Path(f"/proc/sys/kernel/{name}").read_text()))
    return max(64, min(limits or [32768]) // 2)


def default_total_mb() -> int:
    """80% of the memory this process may use, for all sandboxes together: the machine's,
    or the memory limit of the cgroup it runs in (a node's container, a pod) if smaller."""
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) << 10
    limit = own_memory_limit()
    if limit is not None:
        total = min(total, limit)
    return total * 8 // 10 >> 20


def own_memory_limit(proc_cgroup: str | None = None) -> int | None:
    """The smallest memory limit on the path from this process's memory cgroup up to the
    root of the hierarchy as mounted here (/proc/self/cgroup; in a container with its own
    cgroup namespace the root is the container's, whose limit is read there). None where
    nothing limits it or it cannot be read."""
    try:
        text = proc_cgroup if proc_cgroup is not None else _read(Path("/proc/self/cgroup"))
    except OSError:
        return None
    v1 = v2 = None
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            v1 = path
        elif controllers == "":
            v2 = path
    if v1 is not None:
        top, name = ROOT / "memory", "memory.limit_in_bytes"
        where = v1
    elif v2 is not None:
        top = ROOT if (ROOT / "cgroup.controllers").exists() else ROOT / "unified"
        name, where = "memory.max", v2
    else:
        return None
    limits = []
    here = top / where.strip("/")
    for level in (here, *here.parents):
        if not level.is_relative_to(top):
            break
        with contextlib.suppress(OSError, ValueError):
            value = _read(level / name).strip()
            if value != "max":
                limits.append(int(value))
    return min(limits) if limits else None


def remove_owner(version: int, owner: str) -> None:
    """Remove this owner's (empty) parent cgroups when it closes cleanly (and its last
    claim in this process: another jail of the same owner may still be open)."""
    if not _release_owner(owner):
        return
    for base in _bases(version):
        with contextlib.suppress(OSError):
            (base / owner).rmdir()


def _bases(version: int) -> list[Path]:
    if version == 1:
        blkio = [ROOT / "blkio" / "codecage"] if (ROOT / "blkio" / "cgroup.procs").exists() else []
        return [ROOT / c / "codecage" for c in V1_CONTROLLERS] + blkio
    return [(ROOT if (ROOT / "cgroup.controllers").exists() else ROOT / "unified") / "codecage"]


def owner_alive(owner: str, version: int | None = None) -> bool:
    """Whether the process that created `owner` (a directory name under codecage/, or a
    container's owner label, "<pid>-<start>-<PID namespace>-<jail>") still holds its lock:
    ours, or that of any process sharing this cgroup tree. No directory means no one holds
    it. An owner named by a codecage from before the lock ("<pid>-<start>-<jail>": no
    namespace) holds none: it is judged by its pid in this /proc, as it was then (so an
    upgrade never sweeps the live sandboxes of a process still running the old version)."""
    if owner in _claims:
        return True
    if len(owner.split("-")) < 4:
        return _legacy_alive(owner)
    found = version or detect_version()
    if found is None or "/" in owner or owner in ("", ".", ".."):
        return False
    try:
        fd = os.open(_owner_lock_dir(found, owner), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the lock, if it was taken
    return False


def _legacy_alive(owner: str) -> bool:
    pid, _, rest = owner.partition("-")
    try:
        stat = _read(Path(f"/proc/{int(pid)}/stat"))
    except (OSError, ValueError):
        return False
    return stat.rsplit(")", 1)[1].split()[19] == rest.split("-")[0]
