"""The baselines the OCI levels are held to, measured in the same run as the backends side by
side (benchmarks/backends.py): a plain `runc run` / `runsc run` of `python -c pass` with a
bundle on the same root filesystem (`codecage image build`); and the container backend's
engine (Podman's Docker-compatible service, started here if none is configured).

Target (the issue): each OCI level's create -> first result within 2x of its plain runtime.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from codecage._jail import image as _image
from codecage._jail.guest_oom import PIDS_FLOOR
from codecage._jail.gvisor import RUNSC_FLAGS

Measure = Callable[[Callable[[], float | None], int], dict[str, float]]
ENGINE_URL = "unix:///run/codecage/podman-bench.sock"
ENGINE = ["podman", "--runtime", "runc", "--storage-opt", "overlay.skip_mount_home=true"]
RUNTIMES = {"gvisor": "runsc", "container": "runc"}


def _bundle(image: _image.Image) -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 1000, "gid": 1000},
            "args": [image.python, "-c", "pass"],
            "env": ["PATH=/usr/bin:/bin"],
            "cwd": "/",
            "noNewPrivileges": True,
        },
        "root": {"path": str(image.root), "readonly": True},
        "hostname": "sandbox",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["size=64m"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
            "resources": {"pids": {"limit": PIDS_FLOOR}},
        },
    }


def baselines(measure: Measure, n: int) -> dict[str, dict[str, float]]:
    """`runc run` and `runsc run` (the gvisor backend's flags) of python -c pass on the image."""
    image = _image.build(progress=lambda line: None)
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir="/run/codecage") as tmp:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(_bundle(image)))
        for tool, argv in (
            ("runc", ["runc", f"--root={tmp}/runc"]),
            ("runsc", ["runsc", f"--root={tmp}/runsc", *RUNSC_FLAGS]),
        ):
            if shutil.which(tool) is None:
                continue
            print(f"baseline: {tool} run of python -c pass on the image", flush=True)

            def once(argv: list[str] = argv) -> float:
                name = f"bench-{secrets.token_hex(6)}"
                t = time.perf_counter()
                subprocess.run(
                    [*argv, "run", f"--bundle={bundle}", name],
                    check=True,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                )
                elapsed = (time.perf_counter() - t) * 1000
                subprocess.run([*argv, "delete", "--force", name], capture_output=True)
                return elapsed

            once()
            figure = measure(once, n)
            out[f"baseline: {tool} run of python -c pass (the image)"] = {
                "create_first_result_miss_p50_ms": figure["p50_ms"],
                "n": n,
            }
    return out


def ratios(figures: dict[str, dict[str, float]]) -> list[str]:
    """Markdown lines: each OCI level's create -> first result over its plain runtime."""
    lines = [
        "",
        "| OCI level over its plain runtime (target: within 2x) | no pool | with its pool |",
    ]
    lines.append("|---|---:|---:|")
    for backend, tool in RUNTIMES.items():
        ours = figures.get(backend)
        base = figures.get(f"baseline: {tool} run of python -c pass (the image)")
        if ours is None or base is None:
            continue
        plain = base["create_first_result_miss_p50_ms"]
        miss = ours["create_first_result_miss_p50_ms"] / plain
        hit = ours["create_first_result_pool_hit_p50_ms"] / plain
        lines.append(f"| {backend} / `{tool} run` | {miss:.2f}x | {hit:.2f}x |")
    return [*lines, ""]


@contextlib.contextmanager
def engine() -> Iterator[None]:
    """The container backend's engine: CODECAGE_DOCKER_HOST if set, else a Podman service
    started here (and stopped after)."""
    if os.environ.get("CODECAGE_DOCKER_HOST") or shutil.which("podman") is None:
        yield
        return
    sock = ENGINE_URL.removeprefix("unix://")
    service = subprocess.Popen(
        [*ENGINE, "system", "service", "--time=0", ENGINE_URL],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ["CODECAGE_DOCKER_HOST"] = ENGINE_URL
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        yield
    finally:
        from codecage._jail import _jails

        jail = _jails.pop("container", None)
        if jail is not None:
            jail.close()
        os.environ.pop("CODECAGE_DOCKER_HOST", None)
        service.terminate()
        service.wait(timeout=30)
