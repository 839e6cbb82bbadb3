"""Persistent volumes (docs/volumes.md) on the real jail: hard byte and inode quotas
(ENOSPC), one attachment at a time, crash safety (a sandbox killed mid-write, the process
owning it killed mid-write: the image checks clean with `e2fsck -n` and holds every
fsynced write), another owner's volume is the same VolumeNotFound as a missing one, a
hostile archive import is refused or neutralised inside the jail, and the paths checked."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from codecage import Policy, PolicyError, Sandbox, SandboxError, VolumeBusy, VolumeNotFound
from codecage._jail import volumes as host_volumes
from codecage._volumes import Volumes

pytestmark = pytest.mark.requires_root

BACKENDS = ("namespace", "bwrap")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Volumes]:
    yield Volumes(tmp_path / "volumes")


def policy(kind: str) -> Policy:
    return Policy(isolation=kind)  # type: ignore[arg-type]


def out(execution: object) -> str:
    return "".join(execution.logs.stdout)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_volume_keeps_its_files_and_its_quotas_are_hard(store: Volumes, kind: str) -> None:
    store.create("data", 16, inodes=300)
    with Sandbox(policy(kind), volumes={"/home/user": "data"}, volume_store=store) as sbx:
        sbx.run_code("open('/home/user/kept.txt', 'w').write('kept')")
        full = sbx.run_code("open('/home/user/big', 'wb').write(b'x' * (20 << 20))")
        assert full.error is not None and "No space left on device" in full.error.value
        many = sbx.run_code(
            "import os\ntry:\n    for i in range(400): open(f'/home/user/f{i}', 'w').close()\n"
            "except OSError as e: print(e.errno, i)"
        )
        errno_, made = out(many).split()
        assert errno_ == "28" and 250 < int(made) < 400  # ENOSPC on inodes, not on bytes
        mount = sbx.run_code(
            "print([l for l in open('/proc/self/mountinfo') if ' /home/user ' in l][0])"
        )
        assert "nosuid" in out(mount) and "nodev" in out(mount)
    # the control: a sandbox without the volume has none of its files
    with Sandbox(policy(kind)) as plain:
        assert "False" in out(
            plain.run_code("import os; print(os.path.exists('/home/user/kept.txt'))")
        )
    with Sandbox(policy(kind), volumes={"/data": "data"}, volume_store=store) as again:
        assert out(again.run_code("print(open('/data/kept.txt').read())")) == "kept\n"
        # the sandbox's own uid owns what it made, whatever uid made it before
        owner = again.run_code("import os; print(os.stat('/data/kept.txt').st_uid == os.getuid())")
        assert out(owner) == "True\n"
    assert "files" in store.check("data")  # e2fsck -n: SandboxError on any error


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_second_attachment_is_a_clear_error(store: Volumes, kind: str) -> None:
    store.create("once", 8)
    with Sandbox(policy(kind), volumes={"/data": "once"}, volume_store=store):
        with pytest.raises(VolumeBusy, match="attached to a sandbox"):
            Sandbox(policy(kind), volumes={"/data": "once"}, volume_store=store)
        with pytest.raises(VolumeBusy):
            store.delete("once")
    # the control: once the first has ended, it attaches again
    with Sandbox(policy(kind), volumes={"/data": "once"}, volume_store=store) as sbx:
        assert sbx.run_code("1 + 1").text == "2"
    store.delete("once")
    with pytest.raises(VolumeNotFound):
        store.get("once")


def test_another_owners_volume_is_the_same_as_a_missing_one(tmp_path: Path) -> None:
    alice = Volumes(tmp_path / "v", owner="alice")
    bob = Volumes(tmp_path / "v", owner="bob")
    alice.create("mine", 8)
    assert [v.name for v in alice.list()] == ["mine"]  # the control: alice has it
    with pytest.raises(VolumeNotFound) as theirs:
        bob.get("mine")
    with pytest.raises(VolumeNotFound) as missing:
        bob.get("nothing")
    assert str(theirs.value).replace("mine", "X") == str(missing.value).replace("nothing", "X")
    with pytest.raises(VolumeNotFound):
        Sandbox(volumes={"/data": "mine"}, volume_store=bob)
    assert bob.list() == []


WRITER = (
    "import os\n"
    "f = os.open('{path}/log', os.O_WRONLY | os.O_CREAT | os.O_APPEND)\n"
    "for i in range(200):\n"
    "    os.write(f, b'line %d\\n' % i)\n"
    "    os.fsync(f)\n"
    "print('synced', flush=True)\n"
    "while True:\n"
    "    os.write(f, b'unsynced ' * 100 + b'\\n')\n"
)


def _every_fsynced_line_is_there(store: Volumes, name: str, kind: str) -> None:
    store.check(name)  # e2fsck -n -f: SandboxError on any error
    with Sandbox(policy(kind), volumes={"/data": name}, volume_store=store) as sbx:
        lines = out(sbx.run_code("print(open('/data/log').read().count('line '))"))
        assert int(lines) >= 200


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_sandbox_killed_mid_write_leaves_a_clean_volume(store: Volumes, kind: str) -> None:
    store.create("crash", 64)
    sbx = Sandbox(policy(kind), volumes={"/data": "crash"}, volume_store=store)
    synced = threading.Event()
    try:
        pid = sbx._jailed.init_pid  # type: ignore[attr-defined]
        assert pid is not None

        def on_stdout(message: object) -> None:
            if "synced" in str(message):
                synced.set()
                os.kill(pid, signal.SIGKILL)  # kill -9 of the sandbox's init, mid-write

        sbx.run_code(WRITER.format(path="/data"), on_stdout=on_stdout, timeout=60)
    except SandboxError:
        pass
    finally:
        sbx.kill()
    assert synced.is_set()
    assert host_volumes.attached_loop(store.dir / "crash.img") is None  # autoclear freed it
    _every_fsynced_line_is_there(store, "crash", kind)


OWNER = """
import sys
from codecage import Policy, Sandbox
from codecage._volumes import Volumes
store = Volumes(sys.argv[1])
sbx = Sandbox(Policy(isolation=sys.argv[2]), volumes={"/data": "owned"}, volume_store=store)
sbx.run_code(sys.argv[3], on_stdout=lambda m: print(m, flush=True), timeout=120)
"""


@pytest.mark.parametrize("kind", BACKENDS)
def test_the_owning_process_killed_mid_write_leaves_a_clean_volume(
    store: Volumes, kind: str
) -> None:
    """The process that owns the sandbox (the SDK's, or the service's) dies by SIGKILL while
    its sandbox writes: the sandbox dies with it, and the volume is clean and whole."""
    store.create("owned", 64)
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(store.root), kind, WRITER.format(path="/data")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    for line in owner.stdout:
        if "synced" in line:
            break
    owner.kill()
    owner.wait()
    owner.stdout.close()
    assert host_volumes.wait_detached(store.dir / "owned.img", 10.0)
    _every_fsynced_line_is_there(store, "owned", kind)


def _archive(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


HOSTILE = {
    "traversal": _archive((_member("../../escape"), b"out")),
    "absolute": _archive((_member("/etc/evil"), b"out")),
    "through a symlink": _archive(
        (_member("link", tarfile.SYMTYPE, linkname="/tmp"), None),
        (_member("link/evil"), b"out"),
    ),
    "a hard link out": _archive(
        (_member("hard", tarfile.LNKTYPE, linkname="../../etc/passwd"), None)
    ),
    "a device node": _archive((_member("null", tarfile.CHRTYPE, devmajor=1, devminor=3), None)),
    "a fifo": _archive((_member("fifo", tarfile.FIFOTYPE), None)),
}


def test_an_import_is_checked_in_the_jail_and_an_export_round_trips(
    store: Volumes, tmp_path: Path
) -> None:
    store.create("imp", 16)
    good = _archive(
        (_member("dir", tarfile.DIRTYPE, mode=0o755), None),
        (_member("dir/a.txt", mode=0o644), b"alpha"),
        (_member("setuid", mode=0o4755, uid=0), b"#!/bin/sh\n"),
    )
    assert store.import_("imp", [good]) == 3
    with Sandbox(volumes={"/data": "imp"}, volume_store=store) as sbx:
        assert out(sbx.run_code("print(open('/data/dir/a.txt').read())")) == "alpha\n"
        mode = out(sbx.run_code("import os; print(oct(os.stat('/data/setuid').st_mode & 0o7777))"))
        assert mode == "0o755\n"  # the setuid bit neutralised
    exported = b"".join(store.export("imp"))
    with tarfile.open(fileobj=io.BytesIO(exported)) as tar:
        names = sorted(tar.getnames())
    assert names == ["dir", "dir/a.txt", "setuid"]
    for why, archive in HOSTILE.items():
        with pytest.raises(SandboxError, match="could not unpack"):
            store.import_("imp", [archive])
        with Sandbox(volumes={"/data": "imp"}, volume_store=store) as sbx:
            found = out(sbx.run_code("import os; print(sorted(os.listdir('/data')))"))
            # members before the refused one stay (a symlink: harmless, it only points
            # within the sandbox); the refused one is not there
            assert found.replace("'link', ", "") == "['dir', 'lost+found', 'setuid']\n", why
    # the control: unchecked, the same traversal lands outside the directory it unpacks to
    target = tmp_path / "a" / "b"
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(HOSTILE["traversal"])) as tar:
        tar.extractall(target)
    assert (tmp_path / "escape").exists()


@pytest.mark.parametrize(
    "path",
    ["relative", "/", "/home", "/usr/x", "/etc", "/tmp/x", "/proc", "/data/../etc", "/a//b", "/a/"],
)
def test_a_mount_path_that_is_not_allowed_is_refused(store: Volumes, path: str) -> None:
    store.create("p", 8)
    with pytest.raises(PolicyError):
        Sandbox(volumes={path: "p"}, volume_store=store)
    with pytest.raises(PolicyError, match="overlap"):
        Sandbox(volumes={"/data": "p", "/data/x": "q"}, volume_store=store)


def test_the_oci_backends_refuse_volumes_and_io_caps_by_name() -> None:
    from codecage._jail import features

    for backend in ("gvisor", "container"):
        module = __import__(f"codecage._jail.{backend}", fromlist=["LACKING"])
        enforces = features.ALL - frozenset(module.LACKING)
        assert "volumes" not in enforces
        capped = Policy(isolation=backend, volume_read_iops=100)  # type: ignore[arg-type]
        with pytest.raises(PolicyError, match=f"backend '{backend}' cannot enforce io_limits"):
            features.check(backend, enforces, capped)
        with pytest.raises(PolicyError) as plain:  # the control: no cap, no such complaint
            features.check(backend, enforces, Policy(isolation=backend))  # type: ignore[arg-type]
        assert "io_limits" not in str(plain.value)


IO = """
import os, mmap, time
flags = os.O_DIRECT | (os.O_WRONLY | os.O_CREAT if {write} else os.O_RDONLY)
fd = os.open('/data/f', flags)
buf = mmap.mmap(-1, 1 << 20)
t = time.monotonic()
for i in range(2):
    os.write(fd, buf) if {write} else os.readv(fd, [buf])
os.fsync(fd)
os.close(fd)
print(time.monotonic() - t)
"""


@pytest.mark.parametrize("kind", BACKENDS)
def test_disk_io_caps_throttle_a_volume_and_are_reported(store: Volumes, kind: str) -> None:
    """2 MiB written, then read, with O_DIRECT at 1 MiB/s take at least ~2 s (a lower
    bound: the cap's effect, not a speed) and are in limits_hit; without caps, neither."""
    store.create("io", 32)
    for write in (True, False):
        free = Policy(isolation=kind)  # type: ignore[arg-type]
        field = "volume_write_bytes_per_s" if write else "volume_read_bytes_per_s"
        capped = free.model_copy(update={field: 1 << 20})
        for pol in (free, Policy(**capped.model_dump())):
            with Sandbox(pol, volumes={"/data": "io"}, volume_store=store) as sbx:
                ex = sbx.run_code(IO.format(write=write))
                assert ex.error is None, ex.error
                took = float(out(ex))
                if pol is free:
                    assert "volume_io_limit" not in ex.limits_hit
                else:
                    assert took >= 1.5, (field, took)
                    assert "volume_io_limit" in ex.limits_hit, (field, ex.limits_hit)
