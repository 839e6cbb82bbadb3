"""`codecage image build` (the OCI levels' root filesystem) and the host end of the OCI
transport (listeners the sandbox connects to): real files, real sockets."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codecage import TransportError
from codecage._jail import image as _image
from codecage._jail import oci
from codecage._jail.template import Runtime

# a version-2 capability set holding cap_net_raw, as `setcap cap_net_raw+ep` writes it
CAP_NET_RAW_XATTR = bytes.fromhex("0000000200200000000000000000000000000000")


@pytest.mark.requires_root
def test_image_build_is_cached_and_holds_runtime_and_package() -> None:
    if shutil.which("mmdebstrap") is None and _image.current() is None:
        pytest.skip("mmdebstrap is not installed (scripts/install-backends)")
    image = _image.build(progress=lambda line: None)
    again = subprocess.run(
        [sys.executable, "-m", "codecage", "image", "build"], capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert "is up to date" in again.stdout and image.tag in again.stdout  # nothing rebuilt
    runtime = Runtime.default().path.resolve()
    assert (image.root / str(runtime).lstrip("/") / "bin" / "python").exists()
    package = image.root / image.package_root.lstrip("/") / "codecage"
    assert (package / "_inside" / "init.py").read_bytes() == (
        Path(_image.__file__).parent.parent / "_inside" / "init.py"
    ).read_bytes()
    assert (image.root / "usr/bin/python3.11").exists()  # from Debian's packages
    assert not (image.root / "etc/shadow").exists()
    assert (image.root / "home/user").stat().st_mode & 0o7777 == 0o1777
    # the runtime is linked, not copied: the same inode as on the host
    assert (image.root / str(runtime).lstrip("/") / "pyvenv.cfg").stat().st_ino == (
        runtime / "pyvenv.cfg"
    ).stat().st_ino


def test_channel_takes_only_the_announced_kernel_connection() -> None:
    channel = oci.Channel(f"test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        rogue = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        rogue.connect(str(channel.dir / "kernel.sock"))
        rogue.sendall(b"f" * oci.TOKEN_BYTES)  # queued first, with the wrong token
        kernel = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        kernel.connect(str(channel.dir / "kernel.sock"))
        token = "a" * oci.TOKEN_BYTES
        kernel.sendall(token.encode())
        taken = channel.accept_kernel(token, time.monotonic() + 5)
        taken.sendall(b"ping")
        assert kernel.recv(4) == b"ping"  # the announced one, not the rogue
        assert rogue.recv(1) == b""  # dropped
        for sock in (taken, kernel, rogue):
            sock.close()
        with pytest.raises(TransportError, match="did not connect"):
            channel.accept_kernel(token, time.monotonic() + 0.2)
    finally:
        channel.close()
    assert not channel.dir.exists()


def test_supervisor_listener_accepts_once_then_is_gone() -> None:
    channel = oci.Channel(f"test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        init = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        init.connect(str(channel.dir / "supervisor.sock"))
        host = channel.accept_supervisor(time.monotonic() + 5)
        assert not (channel.dir / "supervisor.sock").exists()  # no second connection possible
        late = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with pytest.raises(FileNotFoundError):
            late.connect(str(channel.dir / "supervisor.sock"))
        late.close()
        init.send(b'{"ev": "hello"}')
        assert host.recv(100) == b'{"ev": "hello"}'
        host.close()
        init.close()
    finally:
        channel.close()


@pytest.mark.requires_root  # chown and mknod
def test_strip_privileges_leaves_none_and_the_linked_base_intact(tmp_path: Path) -> None:
    base, image = tmp_path / "base", tmp_path / "image"
    (base / "bin").mkdir(parents=True)
    (base / "bin" / "su").write_bytes(b"#!/bin/sh\n")
    (base / "bin" / "su").chmod(0o4755)
    (base / "bin" / "wall").write_bytes(b"x")
    (base / "bin" / "wall").chmod(0o2755)
    (base / "bin" / "ping").write_bytes(b"x")
    os.setxattr(base / "bin" / "ping", "security.capability", CAP_NET_RAW_XATTR)
    (base / "dev").mkdir()
    os.mknod(base / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (base / "plain").write_bytes(b"keep")
    # positive control: every kind is found
    assert len(_image.privileged_files(base)) == 4, _image.privileged_files(base)
    subprocess.run(["cp", "-a", "--link", str(base), str(image)], check=True)
    _image.strip_privileges(image)
    assert _image.privileged_files(image) == []
    assert (image / "bin" / "su").read_bytes() == b"#!/bin/sh\n"
    assert (image / "bin" / "su").stat().st_mode & 0o7777 == 0o755
    assert (image / "bin" / "wall").stat().st_mode & 0o7777 == 0o755
    assert (image / "plain").stat().st_ino == (base / "plain").stat().st_ino  # still linked
    assert len(_image.privileged_files(base)) == 4  # the cached base keeps its files


@pytest.mark.requires_root
def test_the_built_image_holds_no_privileged_file() -> None:
    """What the OCI levels run on: no setuid/setgid file, file capability or device node
    (the Debian base below it has them: the positive control)."""
    image = _image.current()
    if image is None:
        pytest.skip("the sandbox image is not built: codecage image build")
    base = _image.images_dir() / f"base-{_image.base_key()}" / "rootfs"
    found = _image.privileged_files(base)
    assert any(f.startswith("/usr/bin/su ") for f in found), found[:5]
    assert any(f.startswith("/dev/null ") for f in found), found[:5]
    assert _image.privileged_files(image.root) == []
