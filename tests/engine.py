"""Podman's Docker-compatible API service for the container backend's tests: started when the
test session is configured (the conformance kit asks which backends are available while it
collects) and stopped when it ends. runc as the runtime (crun refuses this host's cgroups),
and no private bind of the storage directory, which Podman would otherwise mount and unmount
as containers come and go (the leak check would see it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

SOCKET = f"/run/codecage/podman-test-{os.getpid()}.sock"
URL = f"unix://{SOCKET}"
COMMAND = [
    "podman",
    "--runtime",
    "runc",
    "--storage-opt",
    "overlay.skip_mount_home=true",
    "system",
    "service",
    "--time=0",
    URL,
]

_service: subprocess.Popen[bytes] | None = None


def start() -> None:
    """Start the service unless podman is missing, we are not root, or one is configured."""
    global _service
    if shutil.which("podman") is None or os.geteuid() != 0 or "CODECAGE_DOCKER_HOST" in os.environ:
        return
    os.makedirs("/run/codecage", exist_ok=True)
    _service = subprocess.Popen(COMMAND, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(SOCKET) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.environ["CODECAGE_DOCKER_HOST"] = URL
    _prepare_image()


def _prepare_image() -> None:
    """The engine's sandbox image, once, before the workers start: each worker's first
    container sandbox would otherwise wait for it (a fresh host imports the base, ~35 s)."""
    from codecage._jail import container, image

    if container.probe() is not None:
        return  # the backend is unavailable: its tests say why
    client = container._client()
    try:
        image.ensure_engine_image(client, image.require(), lambda line: print(line, flush=True))
    finally:
        client.close()


def stop() -> None:
    global _service
    if _service is None:
        return
    from codecage._jail import _jails

    jail = _jails.pop("container", None)
    if jail is not None:
        jail.close()
    _service.terminate()
    _service.wait(timeout=30)
    _service = None
    os.environ.pop("CODECAGE_DOCKER_HOST", None)
    if os.path.exists(SOCKET):
        os.unlink(SOCKET)
