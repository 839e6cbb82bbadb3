"""Shared fixtures. Every test is followed by a leak check: no sandbox process, cgroup or
host mount may outlive the test that started it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from codecage._jail import cgroups
from codecage._jail.namespace import UID_BASE


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        for item in items:
            if item.get_closest_marker("requires_root"):
                item.add_marker(pytest.mark.skip(reason="needs root"))


def sandbox_processes(owner: str | None = None) -> list[str]:
    """Host processes running as a sandbox uid (every sandbox gets one >= UID_BASE) that
    belong to `owner` (default: this process), or to no codecage cgroup at all (escaped).
    Sandboxes of other processes (a parallel run) are not this test's business."""
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
        if f"/codecage/{owner}/" in membership or "/codecage/" not in membership:
            found.append(f"{entry.name}: {status.splitlines()[0]} {membership.split()[0]}")
    return found


def sandbox_cgroups() -> list[str]:
    owner = cgroups.owner_name()
    out = []
    for controller in cgroups.V1_CONTROLLERS:
        base = cgroups.ROOT / controller / "codecage" / owner
        if base.exists():
            out += [str(p) for p in base.iterdir() if p.is_dir()]
    return out


def host_mounts() -> set[str]:
    return {line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()}


@pytest.fixture(autouse=True)
def leak_check() -> Iterator[None]:
    mounts_before = host_mounts()
    yield
    leaks = sandbox_processes() + sandbox_cgroups()
    leaks += [f"mount {m}" for m in host_mounts() - mounts_before]
    assert not leaks, f"left behind by this test: {leaks}"
