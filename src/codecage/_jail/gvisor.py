"""Backend `gvisor`: each sandbox is a runsc sandbox (gVisor's user-space kernel, ptrace
platform) running an OCI bundle on the image of `codecage image build`.

    host: cgroups (created here, runsc joins them) + channel dir + bundle/config.json
      runsc --network=none --host-uds=open --platform=ptrace run --detach
        sentry (the guest's kernel) -> PID 1: codecage._inside.oci -> init -> kernel

What the sandbox's code talks to is the sentry, not the host kernel; the sentry itself
runs under runsc's own seccomp filter. Read-only root; tmpfs workspace, /tmp and /dev/shm
with sizes; no network interface but loopback; cgroup limits on the whole sandbox (sentry
and gofer included: memory counts gVisor's own overhead, and pids.max counts the sentry's
host threads, so runsc needs a floor of PIDS_FLOOR).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from .. import _image
from .._errors import BackendUnavailable, PolicyError, SandboxError
from .._policy import Policy
from . import cgroups, oci
from .namespace import NamespaceJail, NamespaceSandbox
from .template import Runtime, state_dir

PIDS_FLOOR = 256  # below ~256 host tasks in its cgroup, runsc's sentry crashes (MEASURED.md)
RUNSC_FLAGS = ("--network=none", "--host-uds=open", "--platform=ptrace")
START_TIMEOUT_S = 30.0


def runsc() -> str:
    path = shutil.which("runsc")
    if path is None:
        raise BackendUnavailable("gvisor: runsc is not installed (scripts/install-backends)")
    return path


class GvisorJail(NamespaceJail):
    """Sandboxes as runsc sandboxes; the host protocol is the namespace jail's."""

    name = "gvisor"

    def __init__(self, runtime: Runtime | None = None) -> None:  # no template: runsc starts each
        self.runsc = runsc()
        self.runtime = runtime or Runtime.default()
        self.image = _image.require(self.runtime)
        self.rootless = False
        if os.geteuid() != 0:
            raise BackendUnavailable("gvisor: runsc needs root here (cgroups, the OCI bundle)")
        version = cgroups.detect_version()
        if version is None:
            raise BackendUnavailable("gvisor: no usable cgroups")
        self.cgroup_version = version
        self.owner = f"{cgroups.owner_name()}-gvisor"
        cgroups.sweep(version, self.owner)
        total = int(os.environ.get("CODECAGE_TOTAL_MEMORY_MB", 0)) or cgroups.default_total_mb()
        cgroups.cap_owner(version, self.owner, total)
        self.total_memory_mb = total
        self.state_root = state_dir() / "runsc"
        self.state_root.mkdir(exist_ok=True)
        self.pool = None

    def check(self, policy: Policy) -> None:
        if policy.isolation != self.name:
            raise PolicyError(
                f"policy field 'isolation': this backend is {self.name!r}, not {policy.isolation!r}"
            )
        if policy.pids_max is not None and policy.pids_max < PIDS_FLOOR and not policy.allow_weaker:
            raise PolicyError(
                f"policy field 'pids_max': gvisor needs at least {PIDS_FLOOR} (the limit counts "
                f"runsc's own host threads, and runsc crashes below ~{PIDS_FLOOR}); set "
                f"pids_max >= {PIDS_FLOOR}, or allow_weaker=true to have it raised to {PIDS_FLOOR}"
            )

    def create(self, policy: Policy, envs: dict[str, str] | None = None) -> GvisorSandbox:
        self.check(policy)
        pooled = self.pool.take(policy) if self.pool is not None else None
        if pooled is not None:
            if envs:
                pooled.set_envs(envs)
            return pooled  # type: ignore[return-value]
        return GvisorSandbox(self, policy, envs or {})

    def renew_template(self) -> None:
        """Nothing to renew: every sandbox is a fresh runsc process."""

    def maybe_close(self, template: Any) -> None:
        pass

    def close(self) -> None:
        if self.pool is not None:
            self.pool.stop()
        cgroups.remove_owner(self.cgroup_version, self.owner)

    def command(self, *args: str) -> list[str]:
        return [self.runsc, f"--root={self.state_root}", *RUNSC_FLAGS, *args]


class _NoTemplate:
    """The namespace sandbox's template handle, for a backend that has none."""

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass

    def reap(self, pid: int) -> None:
        pass


class GvisorSandbox(NamespaceSandbox):
    """One runsc sandbox. Signals to the code go through init (the host cannot see the
    guest's processes); its death shows as the sentry's exit."""

    jail: GvisorJail

    def __init__(self, jail: GvisorJail, policy: Policy, envs: dict[str, str]) -> None:
        self.id = secrets.token_hex(16)
        self.policy = policy
        self.jail = jail
        self.template = _NoTemplate()  # type: ignore[assignment]
        self.uid = oci.SANDBOX_UID
        self.cgroups: cgroups.SandboxCgroups = cgroups.SandboxCgroups(
            jail.cgroup_version, self.id, jail.owner
        )
        self._closed = False
        self._dying = False
        self._mount_fds: list[int] = []
        self.ended_because = "it was killed"
        self.last_usage = cgroups.Usage(0, 0, 0, 0.0)
        self.generation = -1
        self._kernel: socket.socket | None = None
        self._reader = oci_reader()
        self._pending: list[Any] = []
        self._channel: oci.Channel | None = None
        self._started = False
        try:
            self.cgroups.create(_floored(policy))
            self._channel = oci.Channel(self.id)
            deadline = time.monotonic() + START_TIMEOUT_S
            self._start(envs)
            self._supervisor = self._channel.accept_supervisor(deadline)
            self._await_kernel(deadline)
        except BaseException:
            self.kill()
            raise

    def _start(self, envs: dict[str, str]) -> None:
        assert self._channel is not None
        bundle = oci.bundle_dir(self.id)
        spec = {
            **self._channel.spec(),
            "env": oci.environment(self.jail.runtime, self.policy, envs),
            "landlock": False,  # the sentry has no Landlock; the read-only root does its part
        }
        config = bundle_config(self.jail.image, self.policy, spec, self._channel.dir, self)
        (bundle / "config.json").write_text(json.dumps(config))
        result = subprocess.run(
            self.jail.command("run", "--detach", f"--bundle={bundle}", self.id),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=START_TIMEOUT_S,
        )
        self._started = True
        if result.returncode != 0:
            raise SandboxError(
                f"runsc could not start the sandbox: {result.stderr.decode()[-2000:]}"
            )
        self.init_pid = _sandbox_pid(self.jail, self.id)
        self._init_pidfd = os.pidfd_open(self.init_pid)

    def _supervisor_message(self) -> tuple[Any, list[int]]:
        """init announces a kernel by token: accept that connection as the passed socket."""
        message, fds = super()._supervisor_message()
        if message.get("ev") == "kernel" and not fds and isinstance(message.get("token"), str):
            assert self._channel is not None
            conn = self._channel.accept_kernel(message["token"], time.monotonic() + 10)
            fds = [conn.detach()]
        return message, fds

    def kill_kernel(self) -> None:
        self._signal_inside(signal.SIGKILL)

    def interrupt(self) -> None:
        self._signal_inside(signal.SIGINT)

    def _signal_inside(self, sig: int) -> None:
        with contextlib.suppress(OSError):
            self._supervisor.send(json.dumps({"op": "signal", "signal": int(sig)}).encode())

    def workspace_full(self) -> bool:
        return False  # the guest's tmpfs lives in the sentry's memory: the host cannot statvfs it

    def terminate(self, reason: str) -> None:
        if self._dying:
            return
        super().terminate(reason)
        if self._started:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    self.jail.command("kill", self.id, "KILL"),
                    capture_output=True,
                    timeout=10,
                )

    def kill(self) -> None:
        if self._closed:
            return
        self.terminate(self.ended_because)
        self._closed = True
        if hasattr(self, "_init_pidfd"):
            from .namespace import _readable

            _readable([self._init_pidfd], 5.0)
            os.close(self._init_pidfd)
        if hasattr(self, "_supervisor"):
            self._supervisor.close()
        if self._kernel is not None:
            self._kernel.close()
        if self._started:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    self.jail.command("delete", "--force", self.id),
                    capture_output=True,
                    timeout=30,
                )
        if self._channel is not None:
            self._channel.close()
        shutil.rmtree(state_dir() / "oci" / self.id, ignore_errors=True)
        self.cgroups.remove()


def oci_reader() -> Any:
    from .._inside.protocol import FrameReader

    return FrameReader()


def _floored(policy: Policy) -> Policy:
    if policy.pids_max is not None and policy.pids_max < PIDS_FLOOR:
        return policy.model_copy(update={"pids_max": PIDS_FLOOR})
    return policy


def _sandbox_pid(jail: GvisorJail, sandbox_id: str) -> int:
    result = subprocess.run(
        jail.command("state", sandbox_id), capture_output=True, timeout=10, check=False
    )
    try:
        return int(json.loads(result.stdout)["pid"])
    except (ValueError, KeyError, TypeError):
        raise SandboxError(f"runsc state: {result.stderr.decode()[-500:]}") from None


def _cgroups_path(groups: cgroups.SandboxCgroups) -> str:
    """The OCI cgroupsPath of cgroups created here (the same under every v1 controller)."""
    leaf = next(iter(groups.dirs.values())).relative_to(cgroups.ROOT)
    return "/" + "/".join(leaf.parts[1:] if groups.version == 1 else leaf.parts)


def bundle_config(
    image: _image.Image, policy: Policy, spec: dict[str, Any], channel: Path, sbx: GvisorSandbox
) -> dict[str, Any]:
    """The OCI runtime spec of one sandbox, from its policy."""
    uid = oci.SANDBOX_UID
    rlimits = {
        "RLIMIT_NOFILE": policy.open_files_max,
        "RLIMIT_CORE": 0,
        "RLIMIT_STACK": 8 << 20,
        "RLIMIT_FSIZE": max(policy.disk_mb, policy.tmp_mb, policy.shm_mb) << 20,
    }

    def tmpfs(target: str, size_mb: int, mode: str) -> dict[str, Any]:
        options = [
            "nosuid",
            "nodev",
            f"size={size_mb}m",
            f"mode={mode}",
            f"uid={uid}",
            f"gid={uid}",
        ]
        return {"destination": target, "type": "tmpfs", "source": "tmpfs", "options": options}

    cgroup_path = _cgroups_path(sbx.cgroups)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": uid, "gid": uid},
            "args": oci.bootstrap(image, spec),
            "env": [f"{k}={v}" for k, v in spec["env"].items()],
            "cwd": "/",
            "noNewPrivileges": True,
            "capabilities": {
                "bounding": [],
                "effective": [],
                "permitted": [],
                "inheritable": [],
                "ambient": [],
            },
            "rlimits": [{"type": k, "hard": v, "soft": v} for k, v in rlimits.items()],
        },
        "root": {"path": str(image.root), "readonly": True},
        "hostname": "sandbox",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            tmpfs("/home/user", policy.disk_mb, "0700"),
            tmpfs("/tmp", policy.tmp_mb, "1777"),
            tmpfs("/dev/shm", policy.shm_mb, "1777"),
            {
                "destination": oci.CHANNEL_INSIDE,
                "type": "bind",
                "source": str(channel),
                "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
            },
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "cgroupsPath": cgroup_path,
        },
    }
