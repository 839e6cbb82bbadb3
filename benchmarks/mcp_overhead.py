"""What the MCP layer costs: a `run_python_code` call through `codecage mcp` (stdio and
streamable HTTP, the SDK's own client) against `Sandbox.run_code` in-process, same run.

    .venv/bin/python benchmarks/mcp_overhead.py [-n 200]

Prints medians and p99 in ms and the ratios; also a section of `make bench` (run.py).
"""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import httpx
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from codecage import Sandbox

CODECAGE = str(Path(sys.executable).with_name("codecage"))


def figures(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50_ms": statistics.median(samples), "p99_ms": p99, "n": len(samples)}


async def timed_calls(session: ClientSession, n: int) -> list[float]:
    await session.call_tool("run_python_code", {"code": "1+1"})  # creates the sandbox
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        result = await session.call_tool("run_python_code", {"code": "1+1"})
        samples.append((time.perf_counter() - t) * 1000)
        assert not result.is_error
    return samples


def over_stdio(n: int) -> list[float]:
    async def main() -> list[float]:
        params = StdioServerParameters(command=CODECAGE, args=["mcp"])
        async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            return await timed_calls(s, n)

    return anyio.run(main)


def over_http(n: int) -> list[float]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/mcp"
    server = subprocess.Popen(
        [CODECAGE, "mcp", "--transport", "http", "--port", str(port)], stderr=subprocess.DEVNULL
    )
    try:
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)

        async def main() -> list[float]:
            async with (
                streamable_http_client(url) as (read, write),
                ClientSession(read, write) as s,
            ):
                await s.initialize()
                return await timed_calls(s, n)

        return anyio.run(main)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def in_process(n: int) -> list[float]:
    with Sandbox() as sbx:
        sbx.run_code("1+1")
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            sbx.run_code("1+1")
            samples.append((time.perf_counter() - t) * 1000)
        return samples


RUNS: dict[str, Callable[[int], list[float]]] = {
    "baseline_run_code_in_process": in_process,
    "mcp_stdio_run_python_code": over_stdio,
    "mcp_http_run_python_code": over_http,
}


def mcp_overhead(results: dict[str, dict[str, float]], ratios: dict[str, float], n: int) -> None:
    """The section of `make bench` (run.py): the same figures, ratios against in-process."""
    print("MCP: run_python_code over stdio and streamable HTTP", flush=True)
    figs = {name: figures(fn(n)) for name, fn in RUNS.items()}
    results.update(figs)
    base = figs["baseline_run_code_in_process"]["p50_ms"]
    for name in ("mcp_stdio_run_python_code", "mcp_http_run_python_code"):
        ratios[f"{name}_over_in_process"] = figs[name]["p50_ms"] / base


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=200)
    n = parser.parse_args().n
    results = {name: figures(fn(n)) for name, fn in RUNS.items()}
    base = results["baseline_run_code_in_process"]["p50_ms"]
    for name, fig in results.items():
        ratio = fig["p50_ms"] / base
        print(f"{name:<32} p50 {fig['p50_ms']:7.2f} ms  p99 {fig['p99_ms']:7.2f} ms  x{ratio:.1f}")


if __name__ == "__main__":
    main()
