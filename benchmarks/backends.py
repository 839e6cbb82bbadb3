"""Every isolation backend available here, side by side: create -> first result (pool miss,
pool hit), the `1+1` round trip, memory per idle sandbox. Same policy, same preload.

    .venv/bin/python benchmarks/run.py --backends-only   # this section alone

A backend joins by being registered and available (codecage._jail.available_backends).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from baselines import memory_kb, timed
from density import bwrap_baseline

from codecage import Policy, Sandbox
from codecage._jail import available_backends, features, get_jail
from codecage._jail.host import HostJail

Figures = dict[str, dict[str, float]]
Measure = Callable[[Callable[[], float | None], int], dict[str, float]]
HEADER = "## Backends side by side"


def _first_result(policy: Policy) -> float:
    t = time.perf_counter()
    with Sandbox(policy) as sbx:
        ex = sbx.run_code("print(1)")
        elapsed = (time.perf_counter() - t) * 1000
        assert ex.logs.stdout == ["1\n"], ex
    return elapsed


def _with_pool(jail: HostJail, policy: Policy, measure: Measure, n: int) -> dict[str, float]:
    pool = jail.start_pool(n + 2, policy, refill_per_s=200)
    try:
        deadline = time.monotonic() + 300
        while pool.ready < n + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        hits = pool.hits
        figure = measure(lambda: _first_result(policy), n)
        assert pool.hits - hits >= n * 0.9, "the pool did not serve the measured creates"
        return figure
    finally:
        pool.stop()


def _memory(policy: Policy, count: int) -> dict[str, float]:
    sandboxes = [Sandbox(policy) for _ in range(count)]
    try:
        uss, charged = [], []
        for sbx in sandboxes:
            sbx.run_code("print(1)")
            pids = sbx._jailed.launcher.tree.pids()  # type: ignore[attr-defined]
            uss.append(sum(memory_kb(pid)["uss"] for pid in pids) / 1024)
            charged.append((sbx._jailed.memory_current() or 0) / (1 << 20))
        return {"uss_mb": statistics.median(uss), "charged_mb": statistics.median(charged)}
    finally:
        for sbx in sandboxes:
            sbx.kill()


def backend_figures(measure: Measure, n: int) -> dict[str, dict[str, float]]:
    """name -> figures (p50 ms of each timing, MiB of memory)."""
    out: dict[str, dict[str, float]] = {}
    for name, why in available_backends().items():
        if why is not None:
            print(f"backend {name}: unavailable ({why})", flush=True)
            continue
        jail = get_jail(name)
        assert isinstance(jail, HostJail)
        # a backend that declares a feature it lacks (gvisor) runs only when told so
        weaker = jail.enforces != features.ALL
        policy = Policy(isolation=name, allow_weaker=weaker)  # type: ignore[arg-type]
        print(f"backend {name}: create -> first result (miss, then pool hit)", flush=True)
        _first_result(policy)  # warm whatever the backend starts once
        miss = measure(lambda p=policy: _first_result(p), n)  # type: ignore[misc]
        hit = _with_pool(jail, policy, measure, n)
        print(f"backend {name}: 1+1 round trip, memory per idle sandbox", flush=True)
        with Sandbox(policy) as sbx:
            for _ in range(50):
                sbx.run_code("1+1")
            trip = measure(lambda s=sbx: timed(lambda: s.run_code("1+1")), n * 25)  # type: ignore[misc]
        mem = _memory(policy, 5)
        out[name] = {
            "create_first_result_miss_p50_ms": miss["p50_ms"],
            "create_first_result_pool_hit_p50_ms": hit["p50_ms"],
            "create_first_result_pool_hit_p99_ms": hit["p99_ms"],
            "round_trip_1plus1_p50_ms": trip["p50_ms"],
            "round_trip_1plus1_p99_ms": trip["p99_ms"],
            "idle_uss_mb": mem["uss_mb"],
            "idle_cgroup_charged_mb": mem["charged_mb"],
            "n": n,
        }
    base: Figures = {}
    bwrap_baseline(base, measure, n)
    out["baseline: bwrap + python -c, same imports, per run"] = {
        "create_first_result_miss_p50_ms": base["baseline_bwrap_python_per_run"]["p50_ms"],
        "n": base["baseline_bwrap_python_per_run"]["n"],
    }
    return out


def render(figures: dict[str, dict[str, float]], when: str) -> list[str]:
    lines = [
        HEADER,
        "",
        f"Measured {when} by `python benchmarks/run.py --backends-only` (default policy and",
        "preload: numpy, pandas, matplotlib, IPython). p50 (p99) in ms; memory of one idle",
        "sandbox that ran print(1): its own pages (USS) and what its memory cgroup is charged.",
        "",
        "| backend | create->first result, no pool | with its pool | `1+1` round trip | idle USS MiB | idle charged MiB | n |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, f in figures.items():
        if "round_trip_1plus1_p50_ms" not in f:  # a baseline: one figure
            lines.append(
                f"| {name} | {f['create_first_result_miss_p50_ms']:.1f} | | | | | {int(f['n'])} |"
            )
            continue
        lines.append(
            f"| {name} | {f['create_first_result_miss_p50_ms']:.1f}"
            f" | {f['create_first_result_pool_hit_p50_ms']:.1f} ({f['create_first_result_pool_hit_p99_ms']:.1f})"
            f" | {f['round_trip_1plus1_p50_ms']:.2f} ({f['round_trip_1plus1_p99_ms']:.2f})"
            f" | {f['idle_uss_mb']:.1f} | {f['idle_cgroup_charged_mb']:.1f} | {int(f['n'])} |"
        )
    return [*lines, ""]


def splice(here: Path, figures: dict[str, dict[str, float]]) -> None:
    """Put this section at the end of results.md (replacing an older one) and in results.json."""
    when = time.strftime("%Y-%m-%d %H:%M")
    md = here / "results.md"
    text = md.read_text() if md.exists() else "# Benchmark results\n"
    text = text.split(HEADER)[0].rstrip("\n") + "\n\n" + "\n".join(render(figures, when))
    md.write_text(text)
    js = here / "results.json"
    data = json.loads(js.read_text()) if js.exists() else {}
    data["backends"] = {"date": when, "figures": figures}
    js.write_text(json.dumps(data, indent=2) + "\n")
    print("\n".join(render(figures, when)))
