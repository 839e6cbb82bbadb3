"""`pip install` at run time without network (docs/packages.md), beside its nearest
baseline measured in the same run: an offline install of a package (two wheels: it and its
dependency) from the operator's wheelhouse in a sandbox, from the cell's start to its end
(the host's resolution against the wheelhouse, the policy, the hand-in, pip inside),
against `pip install` of the same wheels from the same directory into a fresh venv on the
host (the venv made before the clock starts). Each install is a first install: a new
sandbox, a new venv.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from codecage import Sandbox
from codecage._jail.template import Runtime
from codecage._wheelhouse import Wheelhouse
from codecage.testing.wheels import make_wheel

Measure = Callable[[Callable[[], float | None], int], dict[str, float]]
Figures = dict[str, dict[str, float]]


def package_figures(results: Figures, ratios: dict[str, float], measure: Measure, n: int) -> None:
    print("offline pip install in a sandbox, against pip install into a fresh venv", flush=True)
    runtime = Runtime.default()
    with tempfile.TemporaryDirectory() as where:
        house = Path(where) / "wheelhouse"
        house.mkdir()
        make_wheel(house, "benchdep", "1.0", "VALUE = 41\n")
        make_wheel(house, "benchpkg", "1.0", "from benchdep import VALUE\n", ("benchdep",))

        def in_sandbox() -> float:
            with Sandbox(wheelhouse=house) as sbx:
                sbx.run_code("1")
                started = time.perf_counter()
                ex = sbx.run_code("!pip install -q benchpkg\nimport benchpkg")
                took = (time.perf_counter() - started) * 1000
                assert ex.error is None and len(sbx.packages) == 2, ex
                return took

        def resolve_only() -> float:
            started = time.perf_counter()
            found = Wheelhouse(house, runtime.python, runtime.site_packages).resolve(["benchpkg"])
            assert len(found) == 2, found
            return (time.perf_counter() - started) * 1000

        def fresh_venv() -> float:
            with tempfile.TemporaryDirectory() as venv:
                subprocess.run([str(runtime.python), "-m", "venv", venv], check=True)
                started = time.perf_counter()
                subprocess.run(
                    [f"{venv}/bin/pip", "install", "-q", "--no-index", "--find-links", str(house),
                     "--disable-pip-version-check", "--no-cache-dir", "benchpkg"],
                    check=True,
                )  # fmt: skip
                took = (time.perf_counter() - started) * 1000
                subprocess.run([f"{venv}/bin/python", "-c", "import benchpkg"], check=True)
                return took

        runs = max(3, n // 8)
        results["pip_install_offline_in_sandbox"] = measure(in_sandbox, runs)
        results["pip_install_host_resolution"] = measure(resolve_only, runs)
        results["baseline_pip_install_into_fresh_venv"] = measure(fresh_venv, runs)
    ratios["pip_install_in_sandbox_over_fresh_venv"] = (
        results["pip_install_offline_in_sandbox"]["p50_ms"]
        / results["baseline_pip_install_into_fresh_venv"]["p50_ms"]
    )
