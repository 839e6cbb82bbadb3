"""The service's snapshot store (docs/fork.md, "Snapshots"): files per tenant, whole or
none, within quotas; what it stores is opaque bytes, never read."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from codecage._errors import QuotaExceeded
from codecage._service.snapshots import SnapshotStore


def save(store: SnapshotStore, tenant: str, data: bytes, name: str | None = None) -> str:
    return store.save(tenant, "sbx", name, {"memory_mb": 256}, True, iter([data])).id


def test_a_snapshot_is_kept_per_tenant_and_given_back_whole(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, max_count=4, max_mb=1)
    first = save(store, "alice", b"a" * 1000, name="one")
    assert [s.id for s in store.list("alice")] == [first] and store.list("bob") == []
    got = store.get("alice", "one")
    assert got is not None and got.id == first and got.policy == {"memory_mb": 256}
    assert b"".join(store.chunks(got)) == b"a" * 1000
    assert store.get("bob", first) is None and store.get("bob", "one") is None
    assert not store.delete("bob", first)  # another tenant's: as none
    for path in tmp_path.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is readable by others ({oct(mode)})"
    assert store.delete("alice", first) and not store.delete("alice", first)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_quotas_refuse_and_keep_nothing(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, max_count=2, max_mb=1)
    save(store, "alice", b"x")
    with pytest.raises(QuotaExceeded, match="snapshot_mb"):
        save(store, "alice", b"y" * (2 << 20))
    save(store, "alice", b"z")
    with pytest.raises(QuotaExceeded, match=r"quotas\.snapshots"):
        save(store, "alice", b"w")
    save(store, "bob", b"v")  # a quota each
    assert len(list(tmp_path.rglob("*.pack"))) == 3 and not list(tmp_path.rglob(".*.tmp"))


def test_a_save_cut_short_leaves_nothing_and_a_stray_is_swept(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, max_count=4, max_mb=64)

    def failing() -> object:
        yield b"part"
        raise OSError("the sandbox went away")

    with pytest.raises(OSError):
        store.save("alice", "sbx", None, {}, True, failing())  # type: ignore[arg-type]
    assert store.list("alice") == [] and not [p for p in tmp_path.rglob("*") if p.is_file()]
    where = next(tmp_path.iterdir())
    (where / ".snap_0000.tmp").write_bytes(b"a crash's leftover")
    SnapshotStore(tmp_path, max_count=4, max_mb=64)
    assert not (where / ".snap_0000.tmp").exists()
    assert not store.delete("alice", "../../etc/passwd")  # only ids of its own form
