"""codecage benchmarks: medians and p99 against baselines measured in the same run.

    make bench            # or: .venv/bin/python benchmarks/run.py [--quick]

Writes benchmarks/results.md and benchmarks/results.json. Never used as a timed test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from codecage import Policy
from codecage._jail import get_jail
from codecage._jail.template import DEFAULT_PRELOAD, Runtime

HERE = Path(__file__).parent


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


def python_c_baseline() -> None:
    imports = ", ".join(m for m in DEFAULT_PRELOAD)
    code = f"import {imports}; print(1)"
    env = Runtime.default().base_env()
    subprocess.run(
        [str(Runtime.default().python), "-c", code], env=env, check=True, capture_output=True
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    n = 10 if args.quick else 40
    jail = get_jail("namespace")
    policy = Policy()
    results: dict[str, dict[str, float]] = {}

    def start_to_first_output() -> None:
        sandbox = jail.create(policy)
        ex = sandbox.execute("print(1)", mode="main", recover=False)
        assert ex.logs.stdout == ["1\n"], ex
        sandbox.kill()

    def first_output_only() -> float:
        t = time.perf_counter()
        sandbox = jail.create(policy)
        ex = sandbox.execute("print(1)", mode="main", recover=False)
        elapsed = (time.perf_counter() - t) * 1000
        assert ex.logs.stdout == ["1\n"], ex
        sandbox.kill()
        return elapsed

    def deadline_to_tree_gone() -> float:
        limit = 0.2
        sandbox = jail.create(policy)
        # A tree that tries to outlive the deadline: setsid, double fork, SIGTERM ignored.
        code = (
            "import os, signal\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        while True: pass\n"
            "while True: pass\n"
        )
        t = time.perf_counter()
        sandbox.execute(code, mode="main", timeout_s=limit, recover=False)
        sandbox.kill()
        return (time.perf_counter() - t - limit) * 1000

    print("warming up ...", flush=True)
    for _ in range(3):
        start_to_first_output()
    print("sandbox start -> first output (template running, no pool)", flush=True)
    results["start_to_first_output"] = measure(first_output_only, n)
    results["one_shot_total_incl_teardown"] = measure(lambda: start_to_first_output(), n)
    print("baseline: python -c with the same imports", flush=True)
    results["baseline_python_c_same_imports"] = measure(python_c_baseline, max(5, n // 4))
    print("deadline -> process tree gone", flush=True)
    results["deadline_to_tree_gone"] = measure(deadline_to_tree_gone, n)
    ratio = (
        results["baseline_python_c_same_imports"]["p50_ms"]
        / results["start_to_first_output"]["p50_ms"]
    )
    write(results, {"start_vs_python_c_speedup": ratio})


def write(results: dict[str, dict[str, float]], ratios: dict[str, float]) -> None:
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {platform.node()}, Python {platform.python_version()}",
        "command": "make bench",
    }
    (HERE / "results.json").write_text(
        json.dumps({"meta": meta, "results": results, "ratios": ratios}, indent=2)
    )
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
    lines += [f"| {k} | {v:.1f}x |" for k, v in ratios.items()]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
