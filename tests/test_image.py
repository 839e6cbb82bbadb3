"""`codecage image build` (the OCI levels' root filesystem) and the host end of the OCI
transport (listeners the sandbox connects to): real files, real sockets."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codecage import TransportError, _image
from codecage._jail import oci
from codecage._jail.template import Runtime


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
        Path(_image.__file__).parent / "_inside" / "init.py"
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
