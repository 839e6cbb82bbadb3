"""What every backend shares on the host: the jail's base (`HostJail`: the policy check,
creating sandboxes, warm pools) and the helpers a launcher uses to build a sandbox's spec
(host uids, the environment, rlimits). The sandbox itself is sandbox.HostSandbox, one class
for every backend over the backend's launcher (launcher.py; docs/backends-internals.md).
"""

from __future__ import annotations

import os
import resource
import secrets
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._errors import PolicyError, SandboxError
from .._inside.messages import GuardRequest
from .._inside.packages import FIND_LINKS, PREFIX, site_dir
from .._policy import Policy
from . import features
from .volumes import Attachment, check_paths

if TYPE_CHECKING:
    from .layers import Layer
    from .pool import Pool
    from .sandbox import HostSandbox
    from .template import Runtime

UID_BASE, UID_SPAN = 1 << 20, (1 << 31) - (1 << 21)


@dataclass
class _Uids:
    lock: threading.Lock = field(default_factory=threading.Lock)
    used: set[int] = field(default_factory=set)

    def take(self) -> int:
        with self.lock:
            while True:
                uid = UID_BASE + secrets.randbelow(UID_SPAN)
                if uid not in self.used:
                    self.used.add(uid)
                    return uid

    def give_back(self, uid: int) -> None:
        with self.lock:
            self.used.discard(uid)


uids = _Uids()  # one pool of host uids for every backend of this process


def raise_nofile() -> None:
    """Each sandbox holds about a dozen descriptors here: use all the host allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def environment(
    runtime: Runtime, policy: Policy, envs: dict[str, str], layer: Layer | None = None
) -> dict[str, str]:
    """A sandbox's environment, for every backend: the runtime's, the paths inside the jail,
    its template's (docs/templates.md), the host variables the policy names, then the
    sandbox's own."""
    env = runtime.base_env() | {
        "HOME": "/home/user",
        "MPLCONFIGDIR": "/home/user/.config/matplotlib",
        "IPYTHONDIR": "/home/user/.ipython",
        "TMPDIR": "/tmp",
        "PYTHONUNBUFFERED": "1",
    }
    if layer is not None:
        env = layer.environment(env)
    pip = pip_environment(runtime.version, env.get("PATH", "/usr/bin:/bin"))
    if env.get("PYTHONPATH"):  # the template's layer, after what pip installs inside
        pip["PYTHONPATH"] += ":" + env["PYTHONPATH"]
    env |= pip
    env |= {k: os.environ[k] for k in policy.env_allowlist if k in os.environ}
    return {**env, **envs}


def pip_environment(version: str, path: str) -> dict[str, str]:
    """pip inside: never an index, only the wheels the host handed in, installed into the
    workspace's site directory (on sys.path), never the read-only runtime (docs/packages.md)."""
    return {
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": FIND_LINKS,
        "PIP_PREFIX": PREFIX,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_NO_CACHE_DIR": "1",
        "PIP_NO_INPUT": "1",
        "PIP_ROOT_USER_ACTION": "ignore",
        "PYTHONPATH": site_dir(version),
        "PATH": f"{path}:{PREFIX}/bin",
    }


def rlimits(policy: Policy) -> dict[str, int]:
    """The rlimits every backend's init sets."""
    return {
        "nofile": policy.open_files_max,
        "core": 0,
        "stack": 8 << 20,
        "fsize": max(policy.disk_mb, policy.tmp_mb, policy.shm_mb) << 20,
    }


def import_guard(policy: Policy) -> GuardRequest | None:
    """The kernel request that puts the policy's module rules in place, if it has any."""
    if policy.modules_allow is None and not policy.modules_deny:
        return None
    allow = policy.modules_allow
    return GuardRequest(
        op="guard",
        modules_allow=None if allow is None else list(allow),
        modules_deny=list(policy.modules_deny),
    )


class HostJail:
    """A backend: checks policies against what it enforces, creates sandboxes (from a warm
    pool of that policy when one is running), keeps the pools. Subclasses set `name`,
    `enforces` (and `why`, the reason for each feature they lack) and implement `spawn`."""

    name: str = ""
    enforces: frozenset[str] = features.ALL
    why: dict[str, str] = {}
    pools: tuple[Pool, ...] = ()  # replaced whole under _pools_lock, read without it
    renewals = 0  # template renewals so far (a pool drops forks of a renewed template)
    templates = False  # whether sandboxes may start from a custom template (docs/templates.md)
    _pools_lock = threading.Lock()

    def check(self, policy: Policy) -> None:
        features.check(self.name, self.enforces, policy, self.why)
        if policy.template is not None:
            if not self.templates:
                raise PolicyError(
                    f"policy field 'template': backend {self.name!r} does not run custom "
                    "templates (namespace and bwrap do; docs/templates.md)"
                )
            from .layers import resolve

            resolve(policy.template)  # TemplateNotFound before anything starts

    def spawn(
        self, policy: Policy, envs: dict[str, str], volumes: tuple[Attachment, ...] = ()
    ) -> HostSandbox:
        """Start a sandbox cold (the pool calls this too): a HostSandbox over this backend's
        launcher, with `volumes` mounted in it (docs/volumes.md)."""
        raise NotImplementedError

    def check_volumes(self, volumes: tuple[Attachment, ...]) -> None:
        """Refuse volumes this backend cannot mount, or mount paths that are not allowed."""
        if not volumes:
            return
        if "volumes" not in self.enforces:
            why = self.why.get("volumes", "")
            raise PolicyError(
                f"backend {self.name!r} cannot mount volumes" + (f" ({why})" if why else "")
            )
        check_paths([v.path for v in volumes])

    def create(
        self,
        policy: Policy,
        envs: dict[str, str] | None = None,
        volumes: tuple[Attachment, ...] = (),
    ) -> HostSandbox:
        self.check(policy)
        self.check_volumes(volumes)
        if volumes:  # a pool's sandboxes were set up already: a volume is mounted at set-up
            sandbox = self.spawn(policy, envs or {}, volumes)
        else:
            pool = self.pool_for(policy)
            pooled = pool.take(policy) if pool is not None else None
            if pooled is not None and envs:
                pooled.set_envs(envs)
            sandbox = pooled or self.spawn(policy, envs or {})
        guard = import_guard(policy)
        if guard is not None:
            try:
                sandbox.setup(guard)
            except BaseException:
                sandbox.kill()
                raise
        return sandbox

    def pool_for(self, policy: Policy) -> Pool | None:
        """The running pool that serves exactly this policy, if any."""
        return next((p for p in self.pools if p.policy == policy), None)

    def start_pool(
        self,
        size: int,
        policy: Policy,
        refill_per_s: float = 50.0,
        template_max_age_s: float = 3600.0,
    ) -> Pool:
        """Keep `size` sandboxes of `policy` started, prefaulted and waiting. One pool per
        policy: a second for the same policy is refused (stop the first)."""
        from .pool import Pool

        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise PolicyError(f"a pool's size must be an integer of at least 1, not {size!r}")
        self.check(policy)
        with self._pools_lock:
            if self.pool_for(policy) is not None:
                raise SandboxError(
                    f"a warm pool for this policy is already running on backend {self.name!r}:"
                    " stop it first (Pool.stop() or codecage.stop_pool(policy))"
                )
            pool = Pool(self, size, policy, refill_per_s, template_max_age_s)
            self.pools = (*self.pools, pool)
        return pool

    def forget_pool(self, pool: Pool) -> None:
        """A stopped pool serves no more creates."""
        with self._pools_lock:
            self.pools = tuple(p for p in self.pools if p is not pool)

    def renew_if_older(self, max_age_s: float) -> bool:
        """Re-execute whatever sandboxes are forked from, if older than `max_age_s`; True
        if it did (every pool then replaces its waiting sandboxes). Nothing to renew here."""
        return False

    def close(self) -> None:
        for pool in self.pools:
            pool.stop()
