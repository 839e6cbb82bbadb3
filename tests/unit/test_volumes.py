"""Volumes above the jail (docs/volumes.md): mount paths and names checked, the policy's
I/O fields, which backends can take volumes, the store's catalogue and quotas (mkfs.ext4
on a plain file needs no root), and E2B's volumeMounts read into {path: name}."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from codecage import Policy, PolicyError, QuotaExceeded, VolumeBusy, VolumeNotFound
from codecage._jail import features
from codecage._jail.volumes import check_paths
from codecage._volumes import Volumes, check_name

needs_mkfs = pytest.mark.skipif(
    shutil.which("mkfs.ext4", path="/usr/sbin:/sbin:/usr/bin:/bin") is None,
    reason="e2fsprogs is not installed",
)


@pytest.mark.parametrize("path", ["/home/user", "/data", "/mnt/v", "/home/user/data", "/srv/a-b.c"])
def test_allowed_mount_paths(path: str) -> None:
    assert check_paths([path]) == [path]


@pytest.mark.parametrize(
    "path",
    [
        "data", "/", "/home", "/usr", "/usr/local", "/etc/x", "/tmp", "/proc/1", "/dev/shm",
        "/var/lib/codecage", "/run/x", "/data/..", "/data/.", "/a//b", "/a/", "/a b", "/.x",
        "/" + "a" * 300,
    ],
)  # fmt: skip
def test_refused_mount_paths(path: str) -> None:
    with pytest.raises(PolicyError):
        check_paths([path])


def test_overlapping_and_too_many_paths_are_refused() -> None:
    with pytest.raises(PolicyError, match="overlap"):
        check_paths(["/data", "/data/inner"])
    assert check_paths(["/data2", "/data"]) == ["/data", "/data2"]  # a prefix, not a parent
    with pytest.raises(PolicyError, match="at most 8"):
        check_paths([f"/d{i}" for i in range(9)])


@pytest.mark.parametrize("name", ["", "A", "-x", "a/b", "..", "a" * 64, "a b", "ü"])
def test_refused_names(name: str) -> None:
    with pytest.raises(PolicyError):
        check_name(name)


def test_io_fields_need_the_io_feature_and_have_units() -> None:
    assert "io_limits" not in features.needed(Policy())
    assert "io_limits" in features.needed(Policy(volume_write_bytes_per_s=1 << 20))
    with pytest.raises(PolicyError, match="volume_read_iops"):
        Policy(volume_read_iops=0)
    with pytest.raises(PolicyError, match="volume_read_bytes_per_s"):
        Policy(volume_read_bytes_per_s=1)
    lacking = features.ALL - {"io_limits"}
    with pytest.raises(PolicyError, match="cannot enforce io_limits"):
        features.check("namespace", lacking, Policy(volume_read_iops=10))
    features.check("namespace", lacking, Policy())  # the control


def test_the_oci_backends_declare_no_volumes() -> None:
    from codecage._jail import container, gvisor

    for module in (gvisor, container):
        assert {"volumes", "io_limits"} <= set(module.LACKING)


@needs_mkfs
def test_the_store_catalogue_and_its_quotas(tmp_path: Path) -> None:
    store = Volumes(tmp_path, owner="t", max_count=2, max_mb=24)
    made = store.create("one", 16, inodes=128)
    assert made.size_mb == 16 and made.inodes == 128
    assert (store.dir / "one.img").stat().st_size == 16 << 20
    assert (store.dir / "one.img").stat().st_mode & 0o777 == 0o600
    with pytest.raises(VolumeBusy, match="exists"):
        store.create("one", 8)
    with pytest.raises(QuotaExceeded, match="volume_mb"):
        store.create("two", 16)
    store.create("two", 8)
    with pytest.raises(QuotaExceeded, match=r"quotas\.volumes"):
        store.create("three", 8)
    assert [v.name for v in store.list()] == ["one", "two"]
    assert "files" in store.check("one")  # e2fsck -n of a fresh image: clean
    with pytest.raises(PolicyError):
        store.create("bad", 4)
    with pytest.raises(PolicyError):
        store.create("bad", 16, inodes=1 << 30)
    other = Volumes(tmp_path, owner="u")
    assert other.list() == []
    with pytest.raises(VolumeNotFound):
        other.get("one")
    with pytest.raises(VolumeNotFound):
        other.delete("one")
    store.delete("one")
    with pytest.raises(VolumeNotFound):
        store.get("one")
    assert not (store.dir / "one.img").exists()


@needs_mkfs
def test_an_attached_volume_cannot_be_attached_or_deleted(tmp_path: Path) -> None:
    store = Volumes(tmp_path)
    store.create("v", 8)
    held = store.attach("v", "/data")
    try:
        with pytest.raises(VolumeBusy, match="one at a time"):
            store.attach("v", "/data")
        with pytest.raises(VolumeBusy):
            store.delete("v")
    finally:
        held.detach()
    store.attach("v", "/data").detach()  # the control: free again
    with pytest.raises(VolumeBusy, match="twice"):
        store.attach_all({"/a": "v", "/b": "v"})


def test_e2b_volume_mounts() -> None:
    from codecage._service.e2b.control import _volume_mounts
    from codecage._service.e2b.errors import E2BError

    assert _volume_mounts(None) == {}
    assert _volume_mounts([{"name": "v", "path": "/data"}]) == {"/data": "v"}
    for bad in ([{"name": "v"}], ["x"], [{"name": 1, "path": "/d"}]):
        with pytest.raises(E2BError):
            _volume_mounts(bad)
    with pytest.raises(E2BError, match="twice"):
        _volume_mounts([{"name": "a", "path": "/d"}, {"name": "b", "path": "/d"}])
