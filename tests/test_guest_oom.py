"""The host's handling of a gVisor guest's OOM (guest_oom.GuestOom), on a real cgroup v1
memory controller with a plain host process standing in for the sentry: the kill is asked
for at memory_mb, before the hard limit above it is ever met; page cache over memory_mb
asks for nothing; a sandbox that goes on growing meets the raised limits, then is given up.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from codecage._jail import cgroups, guest_oom
from codecage._policy import Policy

pytestmark = [
    pytest.mark.requires_root,
    pytest.mark.skipif(cgroups.detect_version() != 1, reason="the host handles it on v1"),
]
MEMORY_MB = 96
H = guest_oom.GUEST_OOM_HEADROOM_MB

# The stand-in for the sentry: told where, it holds memory 4 MiB at a time, a little slower
# than a run of code (so that the handler's thread wakes before the hard limit even when
# the host is loaded), and says how much it holds.
HOLDER = r"""
import mmap, os, sys, time
kind, total_mb = sys.argv[1], int(sys.argv[2])
sys.stdin.readline()  # in its cgroup now
held = []
if kind == "cache":  # page cache: a file on disk, written then read back
    path = sys.argv[3]
    with open(path, "wb") as f:
        for _ in range(total_mb // 4):
            f.write(b"c" * (4 << 20))
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        while f.read(4 << 20):
            pass
else:
    fd = os.memfd_create("guest") if kind == "shmem" else -1
    for i in range(total_mb // 4):
        if kind == "shmem":  # as the sentry's memory file
            os.pwrite(fd, b"s" * (4 << 20), i << 22)
        else:
            held.append(bytearray(b"a" * (4 << 20)))
        time.sleep(0.02)
print("held", total_mb, flush=True)
sys.stdin.readline()
"""


class Watched:
    """A FlooredCgroups with memory_mb, what its handler asked for, and one holder in it."""

    def __init__(self, kill_on_oom: bool, settle_s: float) -> None:
        self.asks: list[guest_oom.GiveUp | None] = []
        self.at_ask: list[tuple[int, int]] = []  # (under_oom, usage) when asked
        self.asked = threading.Event()
        self.kill_on_oom = kill_on_oom
        self.proc: subprocess.Popen[str] | None = None
        self.tree = guest_oom.FlooredCgroups(1, f"oomtest-{uuid.uuid4().hex[:8]}", owner())
        self.tree.on_guest_oom = self._on_oom
        self.tree.settle_s = settle_s
        self.tree.create(Policy(memory_mb=MEMORY_MB))
        self.memory = self.tree.dirs["memory"]

    def _on_oom(self, give_up: guest_oom.GiveUp | None) -> None:
        control = cgroups._keyed((self.memory / "memory.oom_control").read_text())
        usage = int((self.memory / "memory.usage_in_bytes").read_text())
        self.at_ask.append((control["under_oom"], usage))
        self.asks.append(give_up)
        if self.proc is not None and (self.kill_on_oom or give_up is not None):
            self.proc.kill()  # as init would end the guest's kernel
        self.asked.set()

    def hold(self, kind: str, total_mb: int, path: Path | None = None) -> subprocess.Popen[str]:
        args = [sys.executable, "-I", "-c", HOLDER, kind, str(total_mb)]
        self.proc = proc = subprocess.Popen(
            [*args, *([str(path)] if path else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for procs in self.tree.procs_files():
            Path(procs).write_text(str(proc.pid))
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        return proc

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None:
                    pipe.close()
        self.tree.close_files()
        self.tree.remove()


def owner() -> str:
    return cgroups.owner_name()


@pytest.fixture
def watched() -> Iterator[Callable[..., Watched]]:
    made: list[Watched] = []

    def make(kill_on_oom: bool = True, settle_s: float = guest_oom.GUEST_OOM_SETTLE_S) -> Watched:
        made.append(Watched(kill_on_oom, settle_s))
        return made[-1]

    yield make
    for w in made:
        w.close()


@pytest.mark.parametrize("kind", ["anonymous", "shmem"])
def test_the_kill_is_asked_for_at_memory_mb_before_the_hard_limit(
    watched: Callable[..., Watched], kind: str
) -> None:
    w = watched()
    limit = w.memory / "memory.limit_in_bytes"
    assert int(limit.read_text()) == (MEMORY_MB + H) << 20  # the hard limit stands above
    proc = w.hold(kind, MEMORY_MB + H + 64)  # more than the hard limit
    assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stdout.read() if proc.stdout else ""
    assert w.asks == [None]  # end the kernel, once
    # it was asked for at memory_mb, before the sandbox met the hard limit
    ((under_oom, usage),) = w.at_ask
    assert under_oom == 0 and MEMORY_MB << 20 <= usage < (MEMORY_MB + H) << 20, w.at_ask
    assert w.tree.usage().oom_kills == 1


def test_page_cache_over_memory_mb_ends_nothing(watched: Callable[..., Watched]) -> None:
    """Positive control for the last test: the same amount, as page cache, asks for nothing;
    the hard limit reclaims it."""
    w = watched()
    where = Path("/var/tmp") / f"codecage-oomtest-{uuid.uuid4().hex[:8]}"  # a disk, not tmpfs
    try:
        proc = w.hold("cache", MEMORY_MB + H + 64, where)
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"held {MEMORY_MB + H + 64}\n"
        stat = cgroups._keyed((w.memory / "memory.stat").read_text())
        assert stat["total_cache"] > MEMORY_MB << 20  # page cache over memory_mb, charged
        assert proc.poll() is None and w.asks == [] and w.tree.usage().oom_kills == 0
    finally:
        where.unlink(missing_ok=True)


def test_a_sandbox_that_never_gives_back_waits_at_the_hard_limit_then_ends(
    watched: Callable[..., Watched],
) -> None:
    """The kill never lands: at the hard limit the host kernel pauses the sandbox (its OOM
    killer, which would pick the sentry, is kept away), and once settle_s has passed the
    handler gives up on it ("slow")."""
    w = watched(kill_on_oom=False, settle_s=3.0)
    proc = w.hold("anonymous", MEMORY_MB + H + 64)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # killed by the test, once given up
    assert w.asks == [None, "slow"], w.asks
    memory = (w.memory / "memory.oom_control").read_text()
    assert "oom_kill_disable 1" in memory and "oom_kill 0" in memory, memory
    under_oom, usage = w.at_ask[1]  # paused at the hard limit
    assert under_oom == 1 and usage > (MEMORY_MB + H - 4) << 20, w.at_ask
