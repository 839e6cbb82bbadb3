"""Pause and resume (docs/pause.md) beside the nearest baseline measured in the same run: a
cold create of a sandbox (what getting a session back costs without a pause, before any of
its state is rebuilt) on the default backend. The paused sandbox holds a DataFrame and a
thread, as an analysis session would.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from codecage import Sandbox

Measure = Callable[[Callable[[], float | None], int], dict[str, float]]
Figures = dict[str, dict[str, float]]
STATE = (
    "import threading, time, pandas as pd\n"
    "df = pd.DataFrame({'a': range(100_000)})\n"
    "threading.Thread(target=lambda: time.sleep(3600), daemon=True).start()\n"
)


def pause_figures(results: Figures, ratios: dict[str, float], measure: Measure, n: int) -> None:
    print("pause / resume of a session, against a cold create", flush=True)
    with Sandbox() as sbx:
        sbx.run_code(STATE)

        def pause() -> float:
            started = time.perf_counter()
            sbx.pause()
            took = (time.perf_counter() - started) * 1000
            sbx.resume()
            return took

        def resume() -> float:
            sbx.pause()
            started = time.perf_counter()
            sbx.resume()
            return (time.perf_counter() - started) * 1000

        def resume_to_first_result() -> float:
            sbx.pause()
            started = time.perf_counter()
            sbx.resume()
            sbx.run_code("len(df)")
            return (time.perf_counter() - started) * 1000

        results["pause"] = measure(pause, n)
        results["resume"] = measure(resume, n)
        results["resume_to_first_result"] = measure(resume_to_first_result, n)

    def cold_create() -> float:
        started = time.perf_counter()
        with Sandbox() as fresh:
            fresh.run_code("1")
            return (time.perf_counter() - started) * 1000

    results["baseline_cold_create_to_first_result"] = measure(cold_create, max(5, n // 2))
    ratios["cold_create_over_resume_to_first_result"] = (
        results["baseline_cold_create_to_first_result"]["p50_ms"]
        / results["resume_to_first_result"]["p50_ms"]
    )
