"""What a sandbox node decides about its host, on the real cgroup tree: processes that share
the tree but not a PID namespace (pods on one node) never sweep each other's live sandboxes,
and the memory for all sandboxes comes from the cgroup limit the node runs under."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from codecage._jail import cgroups

pytestmark = [
    pytest.mark.requires_root,
    pytest.mark.skipif(cgroups.detect_version() != 1, reason="this host's cgroups are v1"),
]

# A node in a PID namespace of its own: one live sandbox, its owner and id on stdout, then a
# line on stdin runs a cell there (is it still alive?), end of stdin ends the node.
NODE = textwrap.dedent(
    """
    import sys
    import codecage
    from codecage._jail import get_jail
    with codecage.Sandbox() as sbx:
        sbx.run_code("x = 41")
        print(get_jail("namespace").owner, sbx.id, flush=True)
        for line in sys.stdin:
            print(sbx.run_code("x + 1").text, flush=True)
    """
)


def old_alive(owner: str) -> bool:
    """How the sweep decided before: the pid in the owner's name, in this /proc."""
    pid, start = owner.split("-")[:2]
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[19] == start


def sandbox_dirs(owner: str) -> list[Path]:
    return [d for base in cgroups._bases(1) for d in (base / owner).glob("*") if d.is_dir()]


@pytest.fixture
def pod() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", NODE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def test_a_node_in_another_pid_namespace_keeps_its_sandboxes(
    pod: subprocess.Popen[str],
) -> None:
    assert pod.stdout is not None and pod.stdin is not None
    owner, sandbox_id = pod.stdout.readline().split()
    (node,) = Path(f"/proc/{pod.pid}/task/{pod.pid}/children").read_text().split()
    assert sandbox_dirs(owner), owner
    # the scenario is real: the pid in its owner's name is not that process in this /proc,
    # so deciding by our /proc (as the sweep did) calls a live owner dead
    assert not old_alive(owner)
    assert cgroups.owner_alive(owner)
    cgroups.sweep(1, keep_owner="nobody")
    assert sandbox_dirs(owner) and any(d.name == sandbox_id for d in sandbox_dirs(owner))
    pod.stdin.write("again\n")
    pod.stdin.flush()
    assert pod.stdout.readline() == "42\n"  # its sandbox lives on, state and all
    # positive control: once that node is gone (its PID namespace's init killed: every
    # process of the namespace with it), the same sweep removes what it left
    os.kill(int(node), signal.SIGKILL)
    pod.wait()
    deadline = time.monotonic() + 30
    while cgroups.owner_alive(owner) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not cgroups.owner_alive(owner)
    deadline = time.monotonic() + 30
    while sandbox_dirs(owner) and time.monotonic() < deadline:
        cgroups.sweep(1, keep_owner="nobody")
        time.sleep(0.1)
    assert sandbox_dirs(owner) == []
    assert not any((base / owner).exists() for base in cgroups._bases(1))


def test_the_owner_name_differs_between_pid_namespaces() -> None:
    inside = subprocess.run(
        [
            "unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
            "from codecage._jail import cgroups; print(cgroups.owner_name())",
        ],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()[0]  # fmt: skip
    mine = cgroups.owner_name()
    assert inside.split("-")[2] != mine.split("-")[2]  # the PID namespace is in the name
    assert mine == cgroups.owner_name(os.getpid())


def test_the_total_memory_is_that_of_the_cgroup_the_node_runs_in() -> None:
    """A node started in a memory cgroup of 1 GiB gives all its sandboxes 80% of that, not
    80% of the machine (the positive control: this process, not so limited)."""
    machine = cgroups.default_total_mb()
    assert machine > 2000  # control: the machine's share here
    group = cgroups.ROOT / "memory" / f"codecage-test-node-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(1 << 30))
        probe = (
            "import os, sys\n"
            f"open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
            "from codecage._jail import cgroups\n"
            "print(cgroups.default_total_mb())\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
        )
        assert int(out.stdout) == 819, out
    finally:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def alive_elsewhere(owner: str) -> bool:
    """owner_alive as another process sees it."""
    probe = f"from codecage._jail import cgroups; print(cgroups.owner_alive({owner!r}, 1))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


def test_an_owner_two_jails_share_stays_claimed_until_the_last_closes() -> None:
    """The gvisor and container backends name one owner per process: a second jail closing
    (a test's own instance) must not release the lock the first still relies on."""
    owner = f"{cgroups.owner_name()}-test{uuid.uuid4().hex[:8]}"
    assert not alive_elsewhere(owner)  # control: an owner nobody claimed is gone
    cgroups.claim_owner(1, owner)
    cgroups.claim_owner(1, owner)
    try:
        assert alive_elsewhere(owner)
        cgroups.remove_owner(1, owner)
        assert alive_elsewhere(owner) and (cgroups._bases(1)[0] / owner).is_dir()
    finally:
        cgroups.remove_owner(1, owner)
    assert not alive_elsewhere(owner) and not (cgroups._bases(1)[0] / owner).exists()
