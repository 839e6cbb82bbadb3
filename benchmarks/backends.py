"""Every isolation backend side by side: create -> first result (cold and from its pool),
the `1+1` round trip and memory per idle sandbox; and the baselines the OCI levels are held
to, measured in the same run: a plain `runc run` / `runsc run` of `python -c pass` with a
bundle on the same root filesystem (`codecage image build`).

    .venv/bin/python benchmarks/backends.py [--quick]    # also part of `make bench`

Writes the "Backends side by side" section of benchmarks/results.md (and backends.json).
A podman service for the container backend is started here if none answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from codecage import Policy, _image  # noqa: E402
from codecage._jail import available_backends, get_jail  # noqa: E402
from codecage._jail.gvisor import PIDS_FLOOR, RUNSC_FLAGS  # noqa: E402
from codecage._jail.host import HostJail  # noqa: E402

Figures = dict[str, dict[str, float]]
SECTION = "## Backends side by side"
PODMAN_URL = "unix:///run/codecage/podman.sock"


def policy(backend: str) -> Policy:
    # one policy for all: gVisor's pids floor applies to every column
    return Policy(isolation=backend, pids_max=PIDS_FLOOR, allow_weaker=True)  # type: ignore[arg-type]


def measure(fn: Callable[[], float], n: int) -> dict[str, float]:
    samples = [fn() for _ in range(n)]
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50_ms": statistics.median(samples), "p99_ms": p99, "n": n}


def first_result(jail: HostJail, pol: Policy) -> float:
    t = time.perf_counter()
    sbx = jail.create(pol)
    ex = sbx.execute("print(1)")
    elapsed = (time.perf_counter() - t) * 1000
    assert ex.logs.stdout == ["1\n"], ex
    sbx.kill()
    return elapsed


def backend_figures(name: str, n: int, results: Figures, memory: dict[str, float]) -> None:
    jail = get_jail(name)
    assert isinstance(jail, HostJail)
    pol = policy(name)
    print(f"{name}: create -> first result (cold), pool hit, 1+1 round trip", flush=True)
    results[f"{name}_create_to_first_result_cold"] = measure(lambda: first_result(jail, pol), n)
    pool = jail.start_pool(n + 2, pol, refill_per_s=50)
    try:
        deadline = time.monotonic() + 300
        while pool.ready < n + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        results[f"{name}_create_to_first_result_pool_hit"] = measure(
            lambda: first_result(jail, pol), n
        )
    finally:
        pool.stop()
        jail.pool = None
    sbx = jail.create(pol)
    try:
        for _ in range(20):
            sbx.execute("1+1")

        def round_trip() -> float:
            t = time.perf_counter()
            sbx.execute("1+1")
            return (time.perf_counter() - t) * 1000

        results[f"{name}_round_trip_1_plus_1"] = measure(round_trip, n * 20)
        memory[f"{name}_idle_sandbox_cgroup_mb"] = (sbx.memory_current() or 0) / (1 << 20)
    finally:
        sbx.kill()


def _bundle(root: Path, python: str) -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 1000, "gid": 1000},
            "args": [python, "-c", "pass"],
            "env": ["PATH=/usr/bin:/bin"],
            "cwd": "/",
            "noNewPrivileges": True,
        },
        "root": {"path": str(root), "readonly": True},
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


def oci_baselines(n: int, results: Figures) -> None:
    """`runc run` and `runsc run` of python -c pass on the sandbox image."""
    image = _image.require()
    with tempfile.TemporaryDirectory(dir="/run/codecage") as tmp:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps(_bundle(image.root, image.python)))
        commands = {
            "runc": ["runc", f"--root={tmp}/runc"],
            "runsc": ["runsc", f"--root={tmp}/runsc", *RUNSC_FLAGS],
        }
        for tool, argv in commands.items():
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
            results[f"baseline_{tool}_run_python_c_pass"] = measure(once, n)


@contextlib.contextmanager
def podman_service() -> Iterator[None]:
    """The container backend's engine: the one at CODECAGE_DOCKER_HOST, or one started here."""
    if os.environ.get("CODECAGE_DOCKER_HOST") or shutil.which("podman") is None:
        yield
        return
    sock = PODMAN_URL.removeprefix("unix://")
    started = None
    if not os.path.exists(sock):
        started = subprocess.Popen(
            ["podman", "--runtime", "runc", "--storage-opt", "overlay.skip_mount_home=true"]
            + ["system", "service", "--time=0", PODMAN_URL],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
    try:
        yield
    finally:
        if started is not None:
            started.terminate()
            started.wait(timeout=30)


def ratios_of(results: Figures) -> dict[str, float]:
    out = {}
    for backend, tool in (("gvisor", "runsc"), ("container", "runc")):
        base = results.get(f"baseline_{tool}_run_python_c_pass")
        if base is None:
            continue
        for kind in ("cold", "pool_hit"):
            ours = results.get(f"{backend}_create_to_first_result_{kind}")
            if ours is not None:
                out[f"{backend}_first_result_{kind}_over_{tool}_run"] = (
                    ours["p50_ms"] / base["p50_ms"]
                )
    return out


def compare(n: int) -> tuple[Figures, dict[str, float], dict[str, float]]:
    _image.build(progress=lambda line: print(line, flush=True))
    results: Figures = {}
    memory: dict[str, float] = {}
    with podman_service():
        oci_baselines(max(5, n // 2), results)
        for name, why in available_backends().items():
            if why is not None:
                print(f"{name}: skipped ({why})", flush=True)
                continue
            backend_figures(name, n, results, memory)
    return results, ratios_of(results), memory


def section(results: Figures, ratios: dict[str, float], memory: dict[str, float]) -> list[str]:
    when = time.strftime("%Y-%m-%d %H:%M")
    lines = [
        SECTION,
        "",
        f"Measured {when} by `.venv/bin/python benchmarks/backends.py` (also in `make bench`);",
        f"every backend with the same policy (pids_max={PIDS_FLOOR}, allow_weaker for gVisor).",
        "",
        "| figure | p50 ms | p99 ms | n |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {k} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {int(v['n'])} |"
        for k, v in results.items()
    ]
    lines += ["", "| ratio (target: OCI levels within 2x of the plain runtime) | value |"]
    lines += ["|---|---:|"] + [f"| {k} | {v:.2f}x |" for k, v in ratios.items()]
    lines += ["", "| memory per idle sandbox (host cgroup) | MiB |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in memory.items()]
    return lines


def write_section(lines: list[str]) -> None:
    """Replace (or add) this section of results.md, leaving the rest as run.py wrote it."""
    path = HERE / "results.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    head = text.split(SECTION)[0].rstrip("\n")
    path.write_text(head + "\n\n" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    results, ratios, memory = compare(5 if args.quick else 20)
    data = {"results": results, "ratios": ratios, "memory": memory}
    (HERE / "backends.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = section(results, ratios, memory)
    write_section(lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
