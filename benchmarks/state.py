"""State that lasts, beside the nearest baselines measured in the same run, on the default
backend: pause and resume (docs/pause.md) against a cold create of a sandbox (what getting
a session back costs without a pause, before any of its state is rebuilt); a fork
(docs/fork.md) against a cold create plus a tar of the same workspace on the host. The
session holds a DataFrame and a thread (paused) or a DataFrame and 16 MiB of files
(forked), as an analysis session would.
"""

from __future__ import annotations

import subprocess
import tempfile
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


FILES = "import os\nos.makedirs('data', exist_ok=True)\n" + "".join(
    f"open('data/part{i}.bin', 'wb').write(os.urandom(1 << 20))\n" for i in range(16)
)


def fork_figures(results: Figures, ratios: dict[str, float], measure: Measure, n: int) -> None:
    print("fork of a session with 16 MiB of files, against a cold create + a tar", flush=True)
    with Sandbox() as sbx:
        sbx.run_code("import pandas as pd\ndf = pd.DataFrame({'a': range(100_000)})\n" + FILES)

        def fork() -> float:
            started = time.perf_counter()
            child = sbx.fork()
            took = (time.perf_counter() - started) * 1000
            child.kill()
            return took

        results["fork_to_new_sandbox"] = measure(fork, n)

    def cold_create_and_tar() -> float:
        with tempfile.TemporaryDirectory() as where:
            subprocess.run(["dd", "if=/dev/urandom", f"of={where}/data", "bs=1M", "count=16"],
                           check=True, capture_output=True)  # fmt: skip
            started = time.perf_counter()
            with Sandbox() as fresh:
                fresh.run_code("1")
            subprocess.run(["tar", "-cf", f"{where}/copy.tar", "-C", where, "data"], check=True)
            return (time.perf_counter() - started) * 1000

    results["baseline_cold_create_plus_tar_16mib"] = measure(cold_create_and_tar, max(5, n // 2))
    ratios["fork_over_cold_create_plus_tar"] = (
        results["fork_to_new_sandbox"]["p50_ms"]
        / results["baseline_cold_create_plus_tar_16mib"]["p50_ms"]
    )


def volume_figures(results: Figures, ratios: dict[str, float], measure: Measure, n: int) -> None:
    """Volumes (docs/volumes.md): the host's attach (e2fsck -p, a loop device, the mount and
    its idmap), the detach a sandbox's end waits for (the loop device freed), and a create
    to its first result with a volume, beside a cold create measured here too."""
    from codecage._jail.volumes import Mounted, wait_detached
    from codecage._volumes import Volumes

    print("volume attach / detach, and a create with a volume, against a cold create", flush=True)
    with tempfile.TemporaryDirectory() as where:
        store = Volumes(where)
        store.create("bench", 64)
        image = store.dir / "bench.img"

        def attach() -> float:
            started = time.perf_counter()
            mounted = Mounted(image, 1 << 21, 1 << 21)
            took = (time.perf_counter() - started) * 1000
            mounted.close()
            wait_detached(image)
            return took

        def detach() -> float:
            sbx = Sandbox(volumes={"/data": "bench"}, volume_store=store)
            attachment = sbx._jailed.volumes[0]  # type: ignore[attr-defined]
            sbx.kill()
            assert attachment.detach_s is not None  # set by the kill
            return attachment.detach_s * 1000

        def create_with_volume() -> float:
            started = time.perf_counter()
            with Sandbox(volumes={"/data": "bench"}, volume_store=store) as sbx:
                sbx.run_code("1")
                return (time.perf_counter() - started) * 1000

        def cold_create() -> float:
            started = time.perf_counter()
            with Sandbox() as fresh:
                fresh.run_code("1")
                return (time.perf_counter() - started) * 1000

        results["volume_attach_host"] = measure(attach, n)
        results["volume_detach"] = measure(detach, max(5, n // 2))
        results["create_with_volume_to_first_result"] = measure(create_with_volume, max(5, n // 2))
        results["baseline_cold_create_same_run"] = measure(cold_create, max(5, n // 2))
    ratios["create_with_volume_over_cold_create"] = (
        results["create_with_volume_to_first_result"]["p50_ms"]
        / results["baseline_cold_create_same_run"]["p50_ms"]
    )
    ratios["volume_attach_over_cold_create"] = (
        results["volume_attach_host"]["p50_ms"] / results["baseline_cold_create_same_run"]["p50_ms"]
    )
