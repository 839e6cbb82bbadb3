"""The cost of a change, measured against the code before it, in the same run.

    .venv/bin/python benchmarks/regression.py [--base REV] [--rounds 4] [-n 300]

REV's `src/` and `benchmarks/` (default: the last commit before the hostile-tenant fixes)
are exported into a scratch directory. Child processes of the two trees then take turns (base, current, base,
current, ...), each measuring the same three figures with the same script, so that the
machine's drift falls on both sides alike:

- `run_code("1+1")`: the in-process round trip on a warm sandbox;
- pooled create: `Sandbox()` to the first result of `print(1)`, served by a warm pool;
- HTTP execute: `run_code("1+1")` through a `codecage serve` on loopback, audit included.

Each side's figure is the median of its rounds' medians; the ratio is current / base. Also
part of `make bench` (section "regression"). Never used as a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
# The last commit before the fixes of the "Hostile tenants" issue.
BASE = "9b348f4f89e6456557d11c9f769b05e25edbff5e"
FIGURES = ("run_code_1_plus_1", "pooled_create", "http_execute")


def _median_ms(fn: Callable[[], object], n: int) -> float:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return statistics.median(samples)


def _run_code(n: int) -> float:
    from codecage import Sandbox

    with Sandbox() as sbx:
        for _ in range(50):
            sbx.run_code("1+1")
        return _median_ms(lambda: sbx.run_code("1+1"), n)


def _start_pool(size: int) -> Callable[[], None]:
    """A warm pool of the default policy, through whichever API the tree offers."""
    import codecage

    public = getattr(codecage, "start_pool", None)
    if public is not None:
        pool = public(size, refill_per_s=200)
        pool.wait_ready(120)
        return pool.stop  # type: ignore[no-any-return]
    from codecage import Policy
    from codecage._jail import get_jail

    jail = get_jail("namespace")
    pool = jail.start_pool(size, Policy(), refill_per_s=200)  # type: ignore[attr-defined]
    while pool.ready < size:
        time.sleep(0.05)

    def stop() -> None:
        pool.stop()
        jail.pool = None  # type: ignore[attr-defined]

    return stop


def _pooled_create(n: int) -> float:
    from codecage import Sandbox

    samples = []
    n = max(10, n // 6)  # each sample takes a pooled sandbox: keep the pool modest
    stop = _start_pool(n + 5)
    try:
        time.sleep(1.0)  # let the refill settle
        for _ in range(n):
            t = time.perf_counter()
            sbx = Sandbox()
            ex = sbx.run_code("print(1)")
            samples.append((time.perf_counter() - t) * 1000)  # the kill is not part of it
            assert ex.logs.stdout == ["1\n"], ex
            sbx.kill()
        return statistics.median(samples)
    finally:
        stop()


def _http_execute(n: int) -> float:
    # That tree's own way to start its service (its config's keys differ between trees).
    sys.path.insert(0, str(Path(os.environ["PYTHONPATH"]).parent / "benchmarks"))
    from service import running_service

    with running_service() as client, client.Sandbox() as sbx:
        for _ in range(50):
            sbx.run_code("1+1")
        return _median_ms(lambda: sbx.run_code("1+1"), n)


def child(figure: str, n: int) -> None:
    fn = {"run_code_1_plus_1": _run_code, "pooled_create": _pooled_create}.get(
        figure, _http_execute
    )
    print(json.dumps({"p50_ms": fn(n)}))


def export(rev: str, into: Path) -> Path:
    """REV's src/ and benchmarks/ as a tree of its own (git archive: no checkout, no
    worktree to clean)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src", "benchmarks"],
        capture_output=True,
        check=True,
    ).stdout
    tar = into / "base.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    return into / "src"


def measure_side(src: Path, figure: str, n: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", figure, "-n", str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{figure} on {src} failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["p50_ms"])


def compare(base: str, rounds: int, n: int) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        sides = {"base": export(base, Path(tmp)), "current": ROOT / "src"}
        for figure in FIGURES:
            taken: dict[str, list[float]] = {"base": [], "current": []}
            for _ in range(rounds):
                for side, src in sides.items():
                    taken[side].append(measure_side(src, figure, n))
            b, c = statistics.median(taken["base"]), statistics.median(taken["current"])
            rows[figure] = {"base_p50_ms": b, "current_p50_ms": c, "ratio": c / b}
            print(f"{figure}: base {b:.3f} ms, current {c:.3f} ms, ratio {c / b:.3f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=BASE, help="the revision to compare against")
    parser.add_argument("--rounds", type=int, default=4, help="turns each side takes")
    parser.add_argument("-n", type=int, default=300, help="samples per turn")
    parser.add_argument("--child", choices=FIGURES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.n)
        return
    rows = compare(args.base, args.rounds, args.n)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
