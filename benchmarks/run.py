"""codecage benchmarks: medians and p99 against baselines measured in the same run.

    make bench            # or: .venv/bin/python benchmarks/run.py [--quick]

Writes benchmarks/results.md and benchmarks/results.json. Never used as a timed test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import oci  # noqa: E402
from backends import backend_figures, splice  # noqa: E402
from baselines import (  # noqa: E402
    Jupyter,
    PipeRepl,
    fresh_interpreter_memory,
    jupyter_start,
    memory_kb,
    python_c_same_imports,
    timed,
)
from cluster import cluster_figures  # noqa: E402
from density import bwrap_baseline, pool_figures, scaling, throughput  # noqa: E402
from e2b_sdk import e2b_figures  # noqa: E402
from mcp_overhead import mcp_overhead  # noqa: E402
from packages import package_figures  # noqa: E402
from regression import BASE, compare  # noqa: E402
from service import audit_figures, http_figures, service_at_scale  # noqa: E402
from state import fork_figures, pause_figures, volume_figures  # noqa: E402
from templates import template_figures  # noqa: E402
from tools import tool_overhead  # noqa: E402

from codecage import Policy, Sandbox  # noqa: E402
from codecage._jail import get_jail  # noqa: E402
from codecage._jail.namespace import NamespaceJail  # noqa: E402

Figures = dict[str, dict[str, float]]

# A tree that tries to outlive the deadline: SIGTERM ignored, setsid, double fork.
ESCAPING_TREE = (
    "import os, signal\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        while True: pass\n"
    "while True: pass\n"
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(fn: Callable[[], float | None], n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        value = fn()
        samples.append(value if value is not None else (time.perf_counter() - t) * 1000)
    return {"p50_ms": statistics.median(samples), "p99_ms": percentile(samples, 0.99), "n": n}


def jail_start(results: Figures, ratios: dict[str, float], n: int) -> None:
    jail = get_jail("namespace")
    assert isinstance(jail, NamespaceJail)
    policy = Policy()

    def first_output() -> float:
        t = time.perf_counter()
        sandbox = jail.create(policy)
        ex = sandbox.execute("print(1)", mode="main", recover=False)
        elapsed = (time.perf_counter() - t) * 1000
        assert ex.logs.stdout == ["1\n"], ex
        sandbox.kill()
        return elapsed

    def one_shot() -> None:
        sandbox = jail.create(policy)
        sandbox.execute("print(1)", mode="main", recover=False)
        sandbox.kill()

    def deadline_to_tree_gone() -> float:
        limit = 0.2
        sandbox = jail.create(policy)
        t = time.perf_counter()
        sandbox.execute(ESCAPING_TREE, mode="main", timeout_s=limit, recover=False)
        sandbox.kill()
        return (time.perf_counter() - t - limit) * 1000

    for _ in range(3):
        one_shot()
    print("sandbox start -> first output (template running, no pool)", flush=True)
    results["start_to_first_output"] = measure(first_output, n)
    results["one_shot_total_incl_teardown"] = measure(one_shot, n)
    print("baseline: python -c with the same imports", flush=True)
    results["baseline_python_c_same_imports"] = measure(python_c_same_imports, max(5, n // 4))
    print("deadline -> process tree gone", flush=True)
    results["deadline_to_tree_gone"] = measure(deadline_to_tree_gone, n)
    ratios["start_vs_python_c_speedup"] = (
        results["baseline_python_c_same_imports"]["p50_ms"]
        / results["start_to_first_output"]["p50_ms"]
    )


def round_trips(results: Figures, ratios: dict[str, float], n: int) -> None:
    print("run_code('1+1') round trip: codecage, a pipe REPL, a Jupyter kernel", flush=True)
    with Sandbox() as sbx:
        for _ in range(50):
            sbx.run_code("1+1")
        results["run_code_round_trip_in_process"] = measure(
            lambda: timed(lambda: sbx.run_code("1+1")), n
        )
    repl = PipeRepl()
    for _ in range(50):
        repl.run("1+1")
    results["baseline_pipe_repl_round_trip"] = measure(lambda: timed(lambda: repl.run("1+1")), n)
    repl.close()
    kernel = Jupyter()
    for _ in range(20):
        kernel.run("1+1")
    results["baseline_jupyter_round_trip"] = measure(
        lambda: timed(lambda: kernel.run("1+1")), max(50, n // 5)
    )
    kernel.close()
    results["baseline_jupyter_start_to_first_output"] = measure(jupyter_start, 5)
    ours = results["run_code_round_trip_in_process"]["p50_ms"]
    ratios["round_trip_pipe_repl_over_codecage"] = (
        results["baseline_pipe_repl_round_trip"]["p50_ms"] / ours
    )
    ratios["round_trip_jupyter_over_codecage"] = (
        results["baseline_jupyter_round_trip"]["p50_ms"] / ours
    )


def sandbox_memory(memory: dict[str, float]) -> None:
    """Memory of its own (USS) of a sandbox that ran print(1), default preload."""
    print("memory per idle sandbox", flush=True)
    sandboxes = [Sandbox() for _ in range(10)]
    try:
        uss, charged = [], []
        for sbx in sandboxes:
            sbx.run_code("print(1)")
            cg = sbx._jailed.launcher.tree
            uss.append(sum(memory_kb(pid)["uss"] for pid in cg.pids()) / 1024)
            charged.append(int(cg._get("memory", "memory.usage_in_bytes")) / (1 << 20))
        memory["sandbox_uss_mb_median"] = statistics.median(uss)
        memory["sandbox_memory_cgroup_usage_mb_median"] = statistics.median(charged)
    finally:
        for sbx in sandboxes:
            sbx.kill()
    fresh = fresh_interpreter_memory()
    memory["baseline_fresh_interpreter_uss_mb"] = fresh["uss"] / 1024
    memory["baseline_fresh_interpreter_pss_mb"] = fresh["pss"] / 1024


def write(
    results: Figures,
    ratios: dict[str, float],
    memory: dict[str, float],
    rows: list[dict[str, float]],
) -> None:
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {platform.node()}, Python {platform.python_version()}",
        "command": "make bench",
    }
    data = {"meta": meta, "results": results, "ratios": ratios, "memory": memory, "scaling": rows}
    (HERE / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# Benchmark results",
        "",
        f"Measured {meta['date']} on {meta['machine']} by `{meta['command']}`. See docs/benchmarks.md.",
        "",
        "| figure | p50 ms | p99 ms | n |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {k} | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {int(v['n'])} |"
        for k, v in results.items()
    ]
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in ratios.items()]
    lines += ["", "| memory | MiB |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in memory.items()]
    lines += ["", "Live sandboxes (each ran print(1), default preload); plot: scaling.png", ""]
    lines += [
        "| live | create p50 ms | USS MiB per sandbox | memory cgroups charged MiB | host memory used MiB |"
    ]
    lines += ["|---:|---:|---:|---:|---:|"]
    lines += [
        f"| {int(r['live'])} | {r['create_p50_ms']:.1f} | {r['uss_mb_per_sandbox_median']:.1f} |"
        f" {r['cgroup_charged_mb_total']:.0f} | {r['host_used_mb_delta']:.0f} |"
        for r in rows
    ]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--backends-only", action="store_true", help="backends side by side only")
    parser.add_argument(
        "--e2b-only", action="store_true", help="E2B's SDK against codecage's remote SDK only"
    )
    parser.add_argument(
        "--regression-only", action="store_true", help="this tree against the code before it only"
    )
    parser.add_argument(
        "--state-only", action="store_true", help="pause/resume, fork and volume figures only"
    )
    parser.add_argument(
        "--templates-only", action="store_true", help="template build and first create only"
    )
    parser.add_argument(
        "--packages-only", action="store_true", help="pip install from the wheelhouse only"
    )
    parser.add_argument(
        "--cluster-only", action="store_true", help="batch, front end and PostgreSQL figures only"
    )
    args = parser.parse_args()
    n = 10 if args.quick else 40
    if args.cluster_only:
        figures_c: Figures = {}
        rates_c: dict[str, float] = {}
        cluster_figures(figures_c, rates_c, measure, n)
        print(json.dumps({"results": figures_c, "ratios": rates_c}, indent=2))
        return
    if args.templates_only:
        figures_t: Figures = {}
        rates_t: dict[str, float] = {}
        template_figures(figures_t, rates_t, measure, n)
        print(json.dumps({"results": figures_t, "ratios": rates_t}, indent=2))
        return
    if args.backends_only:
        backends_side_by_side()
        return
    if args.regression_only:
        regression(2 if args.quick else 4)
        return
    if args.e2b_only:
        e2b_side_by_side(n)
        return
    if args.state_only or args.packages_only:
        figures: Figures = {}
        rates: dict[str, float] = {}
        if args.state_only:
            pause_figures(figures, rates, measure, n)
            fork_figures(figures, rates, measure, n)
            volume_figures(figures, rates, measure, n)
        else:
            package_figures(figures, rates, measure, n)
        print(json.dumps({"results": figures, "ratios": rates}, indent=2))
        return
    results: Figures = {}
    ratios: dict[str, float] = {}
    memory: dict[str, float] = {}
    jail_start(results, ratios, n)
    bwrap_baseline(results, measure, n)
    pool_figures(results, ratios, measure, n)
    round_trips(results, ratios, n * 25)
    tool_overhead(results, ratios, n * 25)
    mcp_overhead(results, ratios, n * 5)
    http_figures(results, ratios, measure, n * 25)
    e2b_figures(results, ratios, measure, n)
    pause_figures(results, ratios, measure, n)
    fork_figures(results, ratios, measure, n)
    template_figures(results, ratios, measure, n)
    package_figures(results, ratios, measure, n)
    volume_figures(results, ratios, measure, n)
    throughput(results, ratios)
    audit_figures(results, ratios)
    cluster_figures(results, ratios, measure, n)
    service_at_scale(results, ratios, measure, 100 if args.quick else 1000)
    sandbox_memory(memory)
    rows = scaling(HERE, (1, 10, 100) if args.quick else (1, 10, 100, 500, 1000))
    write(results, ratios, memory, rows)
    backends_side_by_side()
    regression(2 if args.quick else 4)


def e2b_side_by_side(n: int) -> None:
    """E2B's code-interpreter SDK and codecage's remote SDK on one `codecage serve`
    (benchmarks/e2b_sdk.py), printed; `make bench` puts them in results.md with the rest."""
    results: Figures = {}
    ratios: dict[str, float] = {}
    e2b_figures(results, ratios, measure, n)
    for name, figure in results.items():
        print(f"| {name} | {figure['p50_ms']:.2f} | {figure['p99_ms']:.2f} | {int(figure['n'])} |")
    for name, value in ratios.items():
        print(f"| {name} | {value:.2f}x |")


def regression(rounds: int) -> None:
    """This tree against the code before the hostile-tenant fixes, taking turns in one run
    (benchmarks/regression.py); the table goes at the end of results.md."""
    rows = compare(BASE, rounds, 300)
    lines = [
        "",
        f"Against the code before the hostile-tenant fixes ({BASE[:10]}), turns taken in the",
        f"same run, {rounds} rounds each (benchmarks/regression.py), {time.strftime('%Y-%m-%d %H:%M')}:",
        "",
        "| figure | base p50 ms | current p50 ms | current / base |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {k} | {v['base_p50_ms']:.3f} | {v['current_p50_ms']:.3f} | {v['ratio']:.3f} |"
        for k, v in rows.items()
    ]
    with (HERE / "results.md").open("a") as md:
        md.write("\n".join(lines) + "\n")


def backends_side_by_side() -> None:
    """Every available backend (the container one with its engine running), then the OCI
    levels' plain-runtime baselines and ratios, measured in the same run."""
    with oci.engine():
        figures = backend_figures(measure, 10)
    figures |= oci.baselines(measure, 10)
    splice(HERE, figures)
    with (HERE / "results.md").open("a") as md:
        md.write("\n".join(oci.ratios(figures)))


if __name__ == "__main__":
    main()
