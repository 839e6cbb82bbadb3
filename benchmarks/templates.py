"""Custom templates (docs/templates.md), beside the nearest baselines measured in the same
run: an offline build from a wheelhouse against a `pip install` of the same packages into a
fresh venv (the runtime's interpreter, the same wheelhouse, no index); the first sandbox
of a template whose process is not running (its start included) against a cold create
of the base template, and a second create of the template once its process runs (each to
the first result of `1`; the layer's package is imported once, untimed, as a check).

The wheelhouse is fetched once before anything is timed (`pip download`, the only
networked step); set BENCH_TEMPLATE_PACKAGES to measure other packages (default duckdb,
one wheel the runtime lacks).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from codecage import Policy
from codecage._jail.namespace import NamespaceJail
from codecage._jail.template import Runtime
from codecage._templates import TemplateSpec, build

Measure = Callable[[Callable[[], float | None], int], dict[str, float]]
Figures = dict[str, dict[str, float]]
WHERE = Path("/var/tmp/codecage-bench-templates")  # not /tmp: the jail hides it


def template_figures(results: Figures, ratios: dict[str, float], measure: Measure, n: int) -> None:
    packages = tuple(os.environ.get("BENCH_TEMPLATE_PACKAGES", "duckdb").split(","))
    print(f"templates: build and first create ({', '.join(packages)})", flush=True)
    runtime = Runtime.default()
    shutil.rmtree(WHERE, ignore_errors=True)
    house = WHERE / "wheelhouse"
    subprocess.run(
        [str(runtime.python), "-m", "pip", "download", "-q", "--only-binary", ":all:",
         "--dest", str(house), *packages],
        check=True,
    )  # fmt: skip
    rounds = max(3, n // 10)
    count = iter(range(1 << 30))
    try:

        def offline_build() -> float:
            root = WHERE / f"store-{next(count)}"  # a fresh store: never the cached build
            started = time.perf_counter()
            build(TemplateSpec(name="bench", pip=packages), offline=True, wheelhouse=house,
                  root=root)  # fmt: skip
            took = (time.perf_counter() - started) * 1000
            shutil.rmtree(root)
            return took

        def venv_pip_install() -> float:
            venv = WHERE / f"venv-{next(count)}"
            started = time.perf_counter()
            subprocess.run([str(runtime.python), "-m", "venv", str(venv)], check=True)
            subprocess.run(
                [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--no-index",
                 "--find-links", str(house), *packages],
                check=True,
            )  # fmt: skip
            took = (time.perf_counter() - started) * 1000
            shutil.rmtree(venv)
            return took

        results["template_build_offline"] = measure(offline_build, rounds)
        results["baseline_fresh_venv_pip_install"] = measure(venv_pip_install, rounds)
        ratios["template_build_over_venv_pip_install"] = (
            results["template_build_offline"]["p50_ms"]
            / results["baseline_fresh_venv_pip_install"]["p50_ms"]
        )
        store = WHERE / "store"
        os.environ["CODECAGE_TEMPLATES"] = str(store)
        spec = TemplateSpec(name="bench", pip=packages)
        made = build(spec, offline=True, wheelhouse=house, root=store)
        results["template_rebuild_cached"] = measure(
            lambda: _timed(lambda: build(spec, offline=True, wheelhouse=house, root=store)), rounds
        )
        module = packages[0].split("=")[0].split("[")[0].replace("-", "_")
        jail = NamespaceJail()
        try:
            templated = Policy(template="bench")

            def first_result(policy: Policy, code: str) -> float:
                started = time.perf_counter()
                sandbox = jail.create(policy)
                ex = sandbox.execute(code, recover=False)
                took = (time.perf_counter() - started) * 1000
                sandbox.kill()
                assert ex.error is None, ex.error
                return took

            first_result(templated, f"import {module}")  # the layer's package imports
            jail.custom.pop(made["id"]).close()

            def first_create_new_template() -> float:
                took = first_result(templated, "1")
                old = jail.custom.pop(made["id"])  # not running for the next round
                old.close()
                return took

            results["template_first_create_to_first_result"] = measure(
                first_create_new_template, rounds
            )
            first_result(templated, "1")  # its process runs from now on
            results["template_warm_create_to_first_result"] = measure(
                lambda: first_result(templated, "1"), max(5, n // 2)
            )
            results["baseline_cold_create_to_first_result_base"] = measure(
                lambda: first_result(Policy(), "1"), max(5, n // 2)
            )
        finally:
            jail.close()
        base = results["baseline_cold_create_to_first_result_base"]["p50_ms"]
        ratios["template_first_create_over_cold_create"] = (
            results["template_first_create_to_first_result"]["p50_ms"] / base
        )
        ratios["template_warm_create_over_cold_create"] = (
            results["template_warm_create_to_first_result"]["p50_ms"] / base
        )
    finally:
        os.environ.pop("CODECAGE_TEMPLATES", None)
        shutil.rmtree(WHERE, ignore_errors=True)


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000
