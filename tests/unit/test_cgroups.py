"""Node-local decisions of the cgroup code, over a cgroup tree made of plain directories:
how much memory all sandboxes get (the machine's, or the limit of the container the node
runs in), and a cgroup v2 tree whose controllers cannot be enabled (a container without
delegation) refusing loudly. What the kernel does with the real files is the root suite's
(tests/test_node.py); this machine has cgroup v1 only, so v2 is known here from its files."""

from __future__ import annotations

from pathlib import Path

import pytest

from codecage import BackendUnavailable
from codecage._jail import cgroups


def v1_tree(root: Path, path: str, limits: dict[str, int]) -> None:
    """memory/<path> with memory.limit_in_bytes at each level named in `limits`."""
    for level, value in limits.items():
        where = root / "memory" / level.strip("/")
        where.mkdir(parents=True, exist_ok=True)
        (where / "memory.limit_in_bytes").write_text(f"{value}\n")
    (root / "memory" / path.strip("/")).mkdir(parents=True, exist_ok=True)


def test_the_smallest_limit_on_the_way_up_is_the_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroups, "ROOT", tmp_path)
    unlimited = 9223372036854771712
    v1_tree(tmp_path, "/kubepods/pod1/node", {"/": unlimited, "/kubepods/pod1": 4 << 30})
    assert cgroups.own_memory_limit("4:memory:/kubepods/pod1/node\n") == 4 << 30
    # the container's own cgroup namespace: its root is the container, limited there
    v1_tree(tmp_path / "ns", "/", {"/": 2 << 30})
    monkeypatch.setattr(cgroups, "ROOT", tmp_path / "ns")
    assert cgroups.own_memory_limit("4:memory,other:/\n") == 2 << 30
    # unlimited everywhere: the number the kernel writes for it (larger than the machine)
    v1_tree(tmp_path / "free", "/a", {"/": unlimited})
    monkeypatch.setattr(cgroups, "ROOT", tmp_path / "free")
    assert cgroups.own_memory_limit("4:memory:/a\n") == unlimited


def test_v2_reads_memory_max_and_max_means_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroups, "ROOT", tmp_path)
    (tmp_path / "cgroup.controllers").write_text("memory pids cpu\n")
    (tmp_path / "pod").mkdir()
    (tmp_path / "pod" / "memory.max").write_text("1073741824\n")
    (tmp_path / "pod" / "node").mkdir()
    (tmp_path / "pod" / "node" / "memory.max").write_text("max\n")
    assert cgroups.own_memory_limit("0::/pod/node\n") == 1 << 30
    (tmp_path / "pod" / "memory.max").write_text("max\n")
    assert cgroups.own_memory_limit("0::/pod/node\n") is None


def test_no_memory_cgroup_is_no_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "ROOT", tmp_path)
    assert cgroups.own_memory_limit("3:pids:/x\n") is None
    assert cgroups.own_memory_limit("4:memory:/not/mounted/here\n") is None


def test_the_total_is_80_percent_of_the_smaller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    machine_mb = int(Path("/proc/meminfo").read_text().split()[1]) >> 10
    monkeypatch.setattr(cgroups, "own_memory_limit", lambda: 1 << 30)
    assert cgroups.default_total_mb() == 819
    monkeypatch.setattr(cgroups, "own_memory_limit", lambda: None)
    assert abs(cgroups.default_total_mb() - machine_mb * 8 // 10) <= 1


def leaf_of(root: Path) -> Path:
    """A sandbox's leaf as cgroup v2 lays it out: <root>/codecage/<owner>/<sandbox>."""
    return root / "codecage" / "owner" / "sandbox"


def test_v2_controllers_that_can_be_enabled_are(tmp_path: Path) -> None:
    cgroups._enable_v2_controllers(leaf_of(tmp_path), io=True)
    for parent in (tmp_path, tmp_path / "codecage", tmp_path / "codecage" / "owner"):
        assert (parent / "cgroup.subtree_control").read_text() == "+memory +pids +cpu +io"


def test_v2_without_delegation_is_a_clear_error(tmp_path: Path) -> None:
    """A container whose processes sit in its root cgroup: writing subtree_control fails
    (EBUSY on a real tree; here the file cannot be written at all). It used to be ignored,
    and sandboxes came without limits."""
    (tmp_path / "cgroup.subtree_control").mkdir()  # writing it fails, as EBUSY would
    with pytest.raises(BackendUnavailable) as info:
        cgroups._enable_v2_controllers(leaf_of(tmp_path))
    message = str(info.value)
    assert "cannot enable memory, pids, cpu" in message and str(tmp_path) in message
    assert "delegated" in message and "cgroup.procs" in message


def test_v2_a_controller_the_kernel_leaves_out_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write went through but the controller is not listed (not delegated to us)."""
    real_write = cgroups._write
    monkeypatch.setattr(cgroups, "_write", lambda p, v: real_write(p, v.replace(" +pids", "")))
    with pytest.raises(BackendUnavailable, match="cannot enable pids for"):
        cgroups._enable_v2_controllers(leaf_of(tmp_path))


def test_an_owner_named_before_the_lock_is_judged_by_its_pid() -> None:
    """Sandboxes of a process still running a codecage from before the owner lock (its
    owners have no PID namespace in their name) are not swept by an upgraded one."""
    pid, start, _ = cgroups.owner_name().split("-")
    assert cgroups.owner_alive(f"{pid}-{start}-1") and cgroups.owner_alive(f"{pid}-{start}-bwrap1")
    assert not cgroups.owner_alive(f"{pid}-{int(start) + 1}-1")  # another process's pid
    assert not cgroups.owner_alive("999999999-1-1")
    # the new form with no lock held: nobody's
    assert not cgroups.owner_alive(f"{pid}-{start}-1-1", version=2)
