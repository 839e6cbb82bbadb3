"""Jail backends: one small interface (create a sandbox; run, signal, kill it).

Backends are registered by name (`BACKENDS`) and loaded lazily from the policy's
`isolation` field. Each declares what it enforces (`enforces`, see features.py) and refuses
a policy asking for more. How a backend plugs in: docs/backends-internals.md.

    __init__.py   the `Jail` and `Jailed` protocols, the `BACKENDS` registry, get_jail
    host.py       HostJail: the jail's base (policy check, create, warm pools); spec helpers
    sandbox.py    HostSandbox: one sandbox's lifecycle over its launcher, for every backend
                  (start, execute, requests, restart, interrupt/kill, readings, ending)
    launcher.py   the Launcher protocol (what a backend provides per sandbox), BaseLauncher
    channel.py    the supervisor and kernel sockets: framing, ids, budget, exit events
    run.py        one execution: pump, deadline, CPU budget, recovery, accounting
    features.py   what a backend enforces, and the check refusing a policy asking for more
    namespace.py  backend `namespace` (default): sandboxes forked from the warm template
    template.py   the host's handle on the template (zygote) process; the staged package
    pool.py       the warm pool: sandboxes forked ahead of demand, handed out once
    layers.py     the store of built templates (docs/templates.md): name -> id -> layer
    bwrap.py      backend `bwrap`: the policy as bubblewrap arguments, one exec per sandbox
    gvisor.py     backend `gvisor`: a runsc sandbox running an OCI bundle
    guest_oom.py  gvisor's host cgroups (a pids floor) and the host's handling of its OOM
    container.py  backend `container`: a container through the Docker Engine API (Podman)
    oci.py        what gvisor and container share: the bundle, init's entry, the listeners
    image.py      `codecage image build`: the OCI backends' root filesystem, cached by hash
                  (and the container engine's image made from it)
    vm.py         backend `vm`: a QEMU guest per sandbox (its own kernel); QEMU jailed on
                  the host, the guest's agent and streams over its one port (HostRelay)
    vmimage.py    `codecage vm build`: the full-VM level's guest kernel, initramfs and
                  ext4 root; booting a guest, the accelerator probe (KVM or TCG)
    cgroups.py    the host's cgroups of a sandbox: limits, readings, killing, removal
    proctree.py   rootless stand-in for cgroups: the sandbox's process tree from its init;
                  KernelWatch, the host's /proc/PID/syscall look at the kernel
    procs.py      the host's end of a sandbox's process manager (background processes)
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .._errors import BackendUnavailable
from .._policy import Policy

if TYPE_CHECKING:
    from .._inside.messages import ReplyRequest
    from .._inside.protocol import Message
    from .._models import Execution, KilledBy
    from .cgroups import Usage
    from .pool import Pool
    from .procs import ProcessManager
    from .volumes import Attachment


class Jailed(Protocol):
    """One live sandbox as the layers above the jail use it: what `Jail.create` returns
    (sandbox.HostSandbox, whatever the backend). `ended_because` says why it ended (once it
    has), `ended_limit` the limit that ended it ("cpu_limit"), if one did."""

    id: str
    policy: Policy
    ended_because: str
    ended_limit: KilledBy | None
    procs: ProcessManager | None  # background processes, once their manager was started

    def process_manager(self) -> ProcessManager:
        """The manager of its background processes, started by init when first needed."""
        ...

    @property
    def alive(self) -> bool: ...

    def execute(
        self,
        code: str,
        *,
        mode: str = "session",
        timeout_s: float | None = None,
        envs: dict[str, str] | None = None,
        on_event: Callable[[Message], None] | None = None,
        recover: bool = True,
    ) -> Execution: ...

    def request(
        self, message: ReplyRequest | Mapping[str, Any], timeout_s: float | None
    ) -> Message: ...

    def record_setup(self, message: ReplyRequest) -> None: ...

    @property
    def setups(self) -> tuple[ReplyRequest, ...]: ...

    def forget_setup(self, drop: Callable[[ReplyRequest], bool]) -> None: ...

    def interrupt(self) -> None: ...

    @property
    def paused(self) -> bool: ...

    def pause(self) -> None: ...

    def resume(self) -> float: ...

    def usage(self) -> Usage: ...

    def memory_current(self) -> int | None: ...

    def terminate(self, reason: str, limit: KilledBy | None = None) -> None: ...

    def end(self, reason: str, limit: KilledBy | None = None) -> None: ...

    def kill(self) -> None: ...


class Jail(Protocol):
    name: str
    enforces: frozenset[str]

    def check(self, policy: Policy) -> None: ...

    def create(
        self,
        policy: Policy,
        envs: dict[str, str] | None = None,
        volumes: tuple[Attachment, ...] = (),
    ) -> Jailed: ...

    def pool_for(self, policy: Policy) -> Pool | None:
        """The running warm pool that serves exactly this policy, if any."""
        ...

    def start_pool(
        self,
        size: int,
        policy: Policy,
        refill_per_s: float = 50.0,
        template_max_age_s: float = 3600.0,
    ) -> Pool:
        """Keep `size` sandboxes of `policy` ready (BackendUnavailable: no pools here)."""
        ...

    def close(self) -> None: ...


class WithoutPools:
    """For a backend whose sandboxes always start cold: the Jail protocol's pool members."""

    name: str

    def pool_for(self, policy: Policy) -> Pool | None:
        return None

    def start_pool(
        self,
        size: int,
        policy: Policy,
        refill_per_s: float = 50.0,
        template_max_age_s: float = 3600.0,
    ) -> Pool:
        raise BackendUnavailable(
            f"isolation backend {self.name!r} has no warm pool: its sandboxes start cold"
        )


@dataclass(frozen=True)
class Backend:
    """A registered backend. `probe` is cheap and side-effect free: None if this host can run
    the backend, else what is missing and how to get it (shown by `codecage doctor`)."""

    name: str
    summary: str
    load: Callable[[], Jail]
    probe: Callable[[], str | None]


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


def available_backends() -> dict[str, str | None]:
    """Every registered backend -> None if available here, else why not (doctor, tests)."""
    out: dict[str, str | None] = {}
    for name, backend in BACKENDS.items():
        try:
            out[name] = backend.probe()
        except Exception as exc:  # a probe must never take the caller down
            out[name] = f"probe failed: {exc}"
    return out


_jails: dict[str, Jail] = {}
_lock = threading.Lock()


def get_jail(name: str) -> Jail:
    """The process-wide jail for a backend, started on first use and closed at exit."""
    with _lock:
        if name not in _jails:
            _jails[name] = _load(name)
        return _jails[name]


def started_jail(name: str) -> Jail | None:
    """The process-wide jail for a backend if it has been started, without starting it."""
    with _lock:
        return _jails.get(name)


def close_jails() -> None:
    """Stop every template this process started (the service calls it on shutdown)."""
    with _lock:
        jails = list(_jails.values())
        _jails.clear()
    for jail in jails:
        jail.close()


def _load(name: str) -> Jail:
    backend = BACKENDS.get(name)
    if backend is None:
        raise BackendUnavailable(
            f"isolation backend {name!r} is not available in this version "
            f"(known: {', '.join(BACKENDS)})"
        )
    why = backend.probe()
    if why is not None:
        raise BackendUnavailable(f"isolation backend {name!r} cannot run on this host: {why}")
    jail = backend.load()
    atexit.register(jail.close)
    return jail


def preload_list() -> tuple[str, ...] | None:
    """The modules sandboxes start with: CODECAGE_PRELOAD="numpy,pandas" (default: the data
    stack, template.DEFAULT_PRELOAD)."""
    preload = os.environ.get("CODECAGE_PRELOAD")
    if preload is None:
        return None
    return tuple(m.strip() for m in preload.split(",") if m.strip())


def _load_namespace() -> Jail:
    from .namespace import NamespaceJail

    return NamespaceJail(preload=preload_list())


def _probe_namespace() -> str | None:
    from . import cgroups
    from .template import Runtime

    runtime = Runtime.default()
    if not runtime.python.exists():
        return f"no sandbox runtime at {runtime.path}: run `make runtime` or set CODECAGE_RUNTIME"
    if os.geteuid() == 0 and cgroups.detect_version() is None:
        return "no usable cgroups (v1 memory/pids/cpu/cpuacct/freezer or v2)"
    return None


register(
    Backend(
        "namespace",
        "fork from a warm template into fresh namespaces, cgroups, seccomp, Landlock",
        _load_namespace,
        _probe_namespace,
    )
)


def _load_bwrap() -> Jail:
    from .bwrap import BwrapJail

    return BwrapJail(preload=preload_list())


def _probe_bwrap() -> str | None:
    from .bwrap import probe

    return probe()


register(
    Backend(
        "bwrap",
        "bubblewrap per sandbox: the same namespaces, cgroups, seccomp, Landlock; exec, no template",
        _load_bwrap,
        _probe_bwrap,
    )
)


def _load_gvisor() -> Jail:
    from .gvisor import GvisorJail

    return GvisorJail()


def _probe_gvisor() -> str | None:
    from .gvisor import probe

    return probe()


register(
    Backend(
        "gvisor",
        "runsc (gVisor's user-space kernel, ptrace platform) running an OCI bundle",
        _load_gvisor,
        _probe_gvisor,
    )
)


def _load_container() -> Jail:
    from .container import ContainerJail

    return ContainerJail()


def _probe_container() -> str | None:
    from .container import probe

    return probe()


register(
    Backend(
        "container",
        "a container through the Docker Engine API (docker-py; Podman's service here)",
        _load_container,
        _probe_container,
    )
)


def _load_vm() -> Jail:
    from .vm import VmJail

    return VmJail()


def _probe_vm() -> str | None:
    from .vm import probe

    return probe()


register(
    Backend(
        "vm",
        "a whole virtual machine per sandbox (QEMU: KVM where it works, TCG otherwise)",
        _load_vm,
        _probe_vm,
    )
)
