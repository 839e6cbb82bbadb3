"""Baselines measured in the same run as codecage's figures."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from codecage._jail.template import DEFAULT_PRELOAD, Runtime

PIPE_REPL = r"""
import sys, json
ns = {}
for line in sys.stdin:
    code = json.loads(line)
    try:
        out = repr(eval(code, ns))
    except SyntaxError:
        exec(code, ns); out = None
    sys.stdout.write(json.dumps(out) + "\n"); sys.stdout.flush()
"""


def python_c_same_imports() -> None:
    runtime = Runtime.default()
    code = f"import {', '.join(DEFAULT_PRELOAD)}; print(1)"
    subprocess.run(
        [str(runtime.python), "-c", code], env=runtime.base_env(), check=True, capture_output=True
    )


class PipeRepl:
    """The floor for a round trip: exec in a persistent namespace over a pipe."""

    def __init__(self) -> None:
        runtime = Runtime.default()
        self.proc = subprocess.Popen(
            [str(runtime.python), "-c", PIPE_REPL],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=runtime.base_env(),
        )

    def run(self, code: str) -> object:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(code) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


class Jupyter:
    """A Jupyter kernel (ipykernel) driven by jupyter_client."""

    def __init__(self) -> None:
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3")

    def run(self, code: str) -> None:
        self.kc.execute_interactive(code, timeout=30, output_hook=lambda msg: None)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def jupyter_start() -> float:
    t = time.perf_counter()
    kernel = Jupyter()
    kernel.run("print(1)")
    elapsed = (time.perf_counter() - t) * 1000
    kernel.close()
    return elapsed


def memory_kb(pid: int) -> dict[str, int]:
    """USS (private pages), PSS and RSS of one process, in KiB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0])
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return {"uss": uss, "pss": fields.get("Pss", 0), "rss": fields.get("Rss", 0)}


def fresh_interpreter_memory() -> dict[str, int]:
    """A fresh interpreter that imported the same stack and printed 1."""
    runtime = Runtime.default()
    code = f"import {', '.join(DEFAULT_PRELOAD)}, sys; print(1, flush=True); sys.stdin.read()"
    proc = subprocess.Popen(
        [str(runtime.python), "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=runtime.base_env(),
    )
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdout.readline()
    mem = memory_kb(proc.pid)
    proc.stdin.close()
    proc.wait()
    proc.stdout.close()
    return mem


def timed(fn: Callable[[], object]) -> float:
    """Milliseconds one call of `fn` takes."""
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def rate(fn: Callable[[int], object], clients: int, seconds: float) -> float:
    """Calls per second of `fn(client_index)` from `clients` threads for `seconds`."""
    import threading

    counts = [0] * clients
    stop = time.monotonic() + seconds

    def work(i: int) -> None:
        while time.monotonic() < stop:
            fn(i)
            counts[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds
