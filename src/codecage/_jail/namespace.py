"""The namespace jail (the default backend): sandboxes forked from a warm template.

The template forks each sandbox and the in-jail pipeline (_inside/pipeline.py) confines it;
everything after the launch (the protocol, budgets, recovery) is sandbox.HostSandbox's.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from .._errors import BackendUnavailable, SandboxError
from .._inside import steps
from .._policy import Policy
from . import cgroups, features, layers, volumes
from .host import UID_BASE, HostJail, environment, raise_nofile, uids
from .host import rlimits as base_rlimits
from .launcher import NO_MOUNTS, BaseLauncher, Launched, Mounts
from .proctree import ProcessTree
from .sandbox import HostSandbox
from .template import DEFAULT_PRELOAD, Runtime, Template
from .volumes import Attachment

__all__ = ["UID_BASE", "NamespaceJail", "NamespaceLauncher"]

_jail_numbers = itertools.count(1)

ROOTLESS_WHY = (
    "not running as root: sandboxes would run in a user namespace without cgroups, "
    "so memory_mb, pids_max, cpu_s become per-process rlimits, cpu_cores is not "
    "enforced, and all sandboxes share this user's host uid"
)


class NamespaceJail(HostJail):
    """Backend `namespace`: forks sandboxes from one template process."""

    name = "namespace"
    templates = True

    def __init__(
        self,
        runtime: Runtime | None = None,
        preload: tuple[str, ...] | None = None,
        max_templates: int | None = None,
    ) -> None:
        raise_nofile()
        # Not root: a user namespace replaces root, and a process tree replaces cgroups.
        self.rootless = os.geteuid() != 0
        version = None if self.rootless else cgroups.detect_version()
        if version is None and not self.rootless:
            raise BackendUnavailable("no usable cgroups (v1 memory/pids/cpu/cpuacct/freezer or v2)")
        self.cgroup_version = version or 0
        # Its own parent cgroup (several jails may live in one process): "<owner>-<n>".
        self.owner = f"{cgroups.owner_name()}-{next(_jail_numbers)}"
        if version is not None:
            cgroups.claim_owner(version, self.owner)
            cgroups.sweep(version, self.owner)
            total = int(os.environ.get("CODECAGE_TOTAL_MEMORY_MB", 0)) or cgroups.default_total_mb()
            cgroups.cap_owner(version, self.owner, total)
            self.total_memory_mb = total
        self.runtime = runtime or Runtime.default()
        self.template = Template(self.runtime, DEFAULT_PRELOAD if preload is None else preload)
        self._templates_lock = threading.Lock()
        # Custom templates' processes, by template id, least recently used first; started on
        # demand, and an idle one beyond `max_templates` is stopped (docs/templates.md).
        self.custom: collections.OrderedDict[str, Template] = collections.OrderedDict()
        self.max_templates = (
            max_templates
            if max_templates is not None
            else int(os.environ.get("CODECAGE_TEMPLATE_PROCESSES", 4))
        )
        self._starting = threading.Lock()  # one custom template started at a time
        self._features()

    def _features(self) -> None:
        """What this host lets the namespace jail enforce (see features.py)."""
        lacking: dict[str, str] = {}
        if self.template.landlock_abi < 1:
            lacking["landlock"] = "this host has no Landlock"
        if self.rootless:
            # rlimits stand in for memory_mb, pids_max and cpu_s: weaker, so refused by default
            for f in ("memory", "kernel_oom", "pids", "cpu_quota", "cpu_budget", "own_uid"):
                lacking[f] = ROOTLESS_WHY
            lacking["volumes"] = lacking["io_limits"] = "not running as root: no loop devices"
        elif (why := volumes.tools()) is not None:
            lacking["volumes"] = lacking["io_limits"] = why
        elif (why := cgroups.io_unavailable(self.cgroup_version)) is not None:
            lacking["io_limits"] = why
        self.enforces = features.ALL - frozenset(lacking)
        self.why = lacking

    @property
    def package(self) -> Path:
        """The staged codecage package sandboxes see (read-only, at this path)."""
        return self.template.package

    def spawn(
        self, policy: Policy, envs: dict[str, str], volumes: tuple[Attachment, ...] = ()
    ) -> HostSandbox:
        return HostSandbox(policy, lambda box: NamespaceLauncher(self, box), envs, volumes=volumes)

    def template_for(self, policy: Policy) -> Template:
        """The template process a sandbox of this policy forks from: the base one, or its
        custom template's, started now if it is not running (TemplateNotFound if there is
        no such template). Taken (`acquire`) before it is returned, so it is never stopped
        between the choice and the fork."""
        if policy.template is None:
            with self._templates_lock:
                template = self.template
                template.acquire()
            return template
        layer = layers.resolve(policy.template)
        with self._templates_lock:
            running = self.custom.get(layer.id)
            if running is not None:
                self._use(layer.id, running)
                idle = self._evictable()
        if running is not None:
            for old in idle:
                self.maybe_close(old)
            return running
        with self._starting:  # not while another sandbox's template starts
            with self._templates_lock:
                found = self.custom.get(layer.id)
            template = found or Template(self.runtime, layer.preload, layer=layer)
            with self._templates_lock:
                self.custom[layer.id] = template
                self._use(layer.id, template)
                idle = self._evictable()
        for old in idle:
            self.maybe_close(old)
        return template

    def _use(self, template_id: str, template: Template) -> Template:
        """The caller holds the lock: most recently used now, and taken."""
        self.custom.move_to_end(template_id)
        template.last_used = time.monotonic()
        template.acquire()
        return template

    def _evictable(self) -> list[Template]:
        """Beyond `max_templates`, the least recently used idle ones are retired (the caller
        holds the lock); they stop now (no sandbox of theirs lives)."""
        out = []
        for template_id, template in list(self.custom.items()):
            if len(self.custom) <= self.max_templates:
                break
            if template.live == 0:
                del self.custom[template_id]
                template.retired = True
                out.append(template)
        return out

    def renew_if_older(self, max_age_s: float) -> bool:
        """The shared template first; then each custom one on its own, so that one which
        cannot start again (its layer removed meanwhile) only retires itself."""
        now = time.monotonic()
        renewed = now - self.template.started > max_age_s
        if renewed:
            self.renew_template()
        with self._templates_lock:
            old = [t for t in self.custom.values() if now - t.started > max_age_s]
        for template in old:
            try:
                self._renew_custom(template)
            except (OSError, SandboxError):
                assert template.layer is not None
                with self._templates_lock:
                    if self.custom.get(template.layer.id) is template:
                        del self.custom[template.layer.id]
                    template.retired = True
                self.maybe_close(template)
            renewed = True
        return renewed

    def _renew_custom(self, template: Template) -> None:
        assert template.layer is not None
        fresh = Template(self.runtime, template.preload, layer=template.layer)
        with self._templates_lock:
            if self.custom.get(template.layer.id) is template:
                self.custom[template.layer.id] = fresh
            else:
                fresh.retired = True
            template.retired = True
        self.maybe_close(template)
        self.maybe_close(fresh)

    def renew_template(self) -> None:
        """Re-execute the template, so sandboxes do not share one address-space layout,
        stack canary and hash secret for ever. Sandboxes of the old one live on; it stops
        when the last of them ends."""
        fresh = Template(self.runtime, self.template.preload)
        with self._templates_lock:
            old, self.template = self.template, fresh
            old.retired = True
        self.maybe_close(old)

    def maybe_close(self, template: Template) -> None:
        with self._templates_lock:
            done = template.retired and template.live == 0 and template is not self.template
        if done:
            template.close()

    def close(self) -> None:
        super().close()
        self.template.close()
        with self._templates_lock:
            custom, self.custom = list(self.custom.values()), collections.OrderedDict()
        for template in custom:
            template.close()
        if self.cgroup_version:
            cgroups.remove_owner(self.cgroup_version, self.owner)


def pid_of(pidfd: int) -> int | None:
    """The host pid a pidfd names (its fdinfo), None once that process has exited."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                pid = int(line.split()[1])
                return pid if pid > 0 else None
    return None


class NamespaceLauncher(BaseLauncher):
    """A sandbox forked from the template; the pipeline confines it on the way to its init."""

    def __init__(self, jail: NamespaceJail, box: HostSandbox) -> None:
        super().__init__(box)
        self.id, self.policy = box.id, box.policy
        self.jail = jail
        # its own (acquired): the jail may re-execute a newer one meanwhile
        self.template = jail.template_for(box.policy)
        self.uid = uids.take()
        self.tree: cgroups.SandboxCgroups | ProcessTree = (
            ProcessTree()
            if jail.rootless
            else cgroups.SandboxCgroups(jail.cgroup_version, self.id, jail.owner)
        )

    def launch(self, envs: dict[str, str], timeout_s: float = 30.0) -> Launched:
        """The template forks a bare set-up process; its spec (environment, uid, cgroups)
        goes to it over its own channel, and it answers with a pidfd on init."""
        mounted = volumes.mount_all(self.box.volumes, self.uid, self.uid)
        try:
            if cgroups.io_limited(self.policy) and isinstance(self.tree, cgroups.SandboxCgroups):
                for m in mounted:  # before any process of the sandbox can touch it
                    self.tree.limit_io(m.rdev, self.policy)
            supervisor = self.template.spawn(timeout_s)
            try:
                supervisor.settimeout(timeout_s)
                spec = json.dumps(self._spec(envs)).encode()
                socket.send_fds(supervisor, [spec], [m.fd for m in mounted])
                data, fds, _flags, _addr = socket.recv_fds(supervisor, 65536, 1)
            except BaseException:
                supervisor.close()
                raise
        finally:  # set-up has its own descriptors on the mounts, or has failed (and freed them)
            for m in mounted:
                m.close()
        try:
            message = json.loads(data) if data else {"ev": "error", "message": "no report"}
            if not isinstance(message, dict) or message.get("ev") != "init" or len(fds) != 1:
                why = message.get("message") if isinstance(message, dict) else None
                raise SandboxError(f"sandbox set-up failed: {why or 'a bad report'}")
            pidfd = fds.pop()
            pid = pid_of(pidfd)  # the kernel's word on whom the pidfd names, not set-up's
            if pid is None or (not self.jail.rootless and pid not in self.tree.pids()):
                os.close(pidfd)
                raise SandboxError("sandbox set-up failed: its init is gone or not in its cgroup")
        except BaseException:
            for fd in fds:
                os.close(fd)
            supervisor.close()
            raise
        if isinstance(self.tree, ProcessTree):
            self.tree.attach(pid)
        return Launched(supervisor, pidfd, pid)

    def open_mounts(self) -> Mounts:
        if self.jail.rootless:  # another user namespace's root is closed to us
            return NO_MOUNTS
        return super().open_mounts()

    def release(self, init_dead: bool) -> None:
        if init_dead and self.box.init_pid is not None:
            # init is now a zombie of the template: have it reaped before we return
            with contextlib.suppress(OSError, SandboxError):
                self.template.reap()
        uids.give_back(self.uid)
        self.template.release()
        self.jail.maybe_close(self.template)

    def _spec(self, envs: dict[str, str]) -> dict[str, Any]:
        p, runtime = self.policy, self.jail.runtime
        layer = self.template.layer
        env = environment(runtime, p, envs, layer)
        binds = ["/usr", str(runtime.path.resolve()), str(self.template.package)]
        if layer is not None:
            binds.append(str(layer.path))  # read-only, at the same path (docs/templates.md)
        rlimits = base_rlimits(p)
        rlimits["fsize"] = max(rlimits["fsize"], volumes.largest_bytes(self.box.volumes))
        if self.jail.rootless:  # no cgroups: per-process rlimits are all there is
            if p.pids_max is not None:
                rlimits["nproc"] = p.pids_max
            if p.cpu_s is not None:
                rlimits["cpu"] = int(p.cpu_s)
            if p.memory_mb is not None:
                rlimits["data"] = self.template.data_bytes + (p.memory_mb << 20)
        return {
            "id": self.id,
            "uid": 1000 if self.jail.rootless else self.uid,
            "gid": 1000 if self.jail.rootless else self.uid,
            "userns": {"uid": os.geteuid(), "gid": os.getegid()} if self.jail.rootless else None,
            "root_mountpoint": str(self.template.root_mountpoint),
            "cgroup_procs": self.tree.procs_files(),
            "cgroup_controllers": self.tree.mount_names,
            "ro_binds": [
                b for b in dict.fromkeys(binds) if not b.startswith("/usr/") or b == "/usr"
            ],
            "workspace_mb": p.disk_mb,
            "tmp_mb": p.tmp_mb,
            "shm_mb": p.shm_mb,
            "env": env,
            "rlimits": rlimits,
            "landlock": self.template.landlock_abi >= 1,
            # the one confinement list runs whole, in set-up and init; only the preload is
            # the template's, done once before it forks any sandbox (_inside/steps.py)
            "done": steps.claim("preload"),
            "volumes": [{"path": v.path} for v in self.box.volumes],
        }
