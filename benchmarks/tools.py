"""Tool-call overhead: what `codecage.tools.CodeTool` adds on top of `run_code` (argument
parsing and checking, turning the Execution into each API's result, placing the images).

    .venv/bin/python benchmarks/tools.py [--n 2000]     # this section alone, printed
    (also part of `make bench`, via run.py)

Two views, same run, same sandbox: end to end (`run_code` vs a tool call for the same
code, samples interleaved so drift hits both alike), and the conversion alone (the tool
handling a call whose Execution is replayed, so no sandbox time is in it at all).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from anthropic.types import ToolUseBlock
from openai.types.chat import ChatCompletionMessageFunctionToolCall
from openai.types.responses import ResponseFunctionToolCall

from codecage import Execution, Sandbox
from codecage.tools import TOOL_NAME, CodeTool

Figures = dict[str, dict[str, float]]
TEXT = "1+1"
CHART = (
    "import matplotlib.pyplot as plt\nplt.figure(figsize=(4, 3)); plt.plot([1, 3, 2]); plt.show()"
)


def calls(code: str) -> dict[str, Callable[[CodeTool], Any]]:
    """One execute_python call per API, as the SDKs hand them to the agent's code."""
    arguments = json.dumps({"code": code})
    anthropic = ToolUseBlock(type="tool_use", id="toolu_1", name=TOOL_NAME, input={"code": code})
    chat = ChatCompletionMessageFunctionToolCall(
        id="call_1", type="function", function={"name": TOOL_NAME, "arguments": arguments}
    )
    responses = ResponseFunctionToolCall(
        type="function_call", call_id="fc_1", name=TOOL_NAME, arguments=arguments
    )
    return {
        "anthropic": lambda tool: tool.anthropic_result(anthropic),
        "openai_chat": lambda tool: tool.openai_chat_result(chat),
        "openai_responses": lambda tool: tool.openai_responses_result(responses),
    }


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50_ms": statistics.median(samples), "p99_ms": p99, "n": len(samples)}


def interleaved(cases: dict[str, Callable[[], Any]], n: int) -> Figures:
    """Each case once per round, n rounds: medians of the same moments."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(n):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - t) * 1000)
    return {name: summary(values) for name, values in samples.items()}


class Replay:
    """A stand-in sandbox that returns one recorded Execution: the tool's own work only."""

    alive = True

    def __init__(self, ex: Execution) -> None:
        self.ex = ex

    def run_code(self, code: str, timeout: float | None = None) -> Execution:
        return self.ex

    def kill(self) -> None:
        pass


def end_to_end(sbx: Sandbox, code: str, label: str, n: int) -> Figures:
    tool = CodeTool(sandbox=lambda _policy: sbx)
    cases: dict[str, Callable[[], Any]] = {f"tool_run_code_{label}": lambda: sbx.run_code(code)}
    for api, call in calls(code).items():
        cases[f"tool_call_{api}_{label}"] = lambda call=call: call(tool)
    interleaved(cases, max(5, n // 10))  # warm-up
    return interleaved(cases, n)


def conversion_only(ex: Execution, code: str, label: str, n: int) -> Figures:
    tool = CodeTool(sandbox=lambda _policy: Replay(ex))
    cases = {
        f"tool_overhead_{api}_{label}": lambda call=call: call(tool)
        for api, call in calls(code).items()
    }
    interleaved(cases, max(5, n // 10))
    return interleaved(cases, n)


def analysis_cost(results: Figures, ratios: dict[str, float], n: int) -> None:
    """Static analysis runs before every run: its cost by cell size, against ast.parse of
    the same text (the part no analysis on the AST can avoid)."""
    import ast
    from pathlib import Path

    from codecage import analyze

    demo = (Path(__file__).parent.parent / "examples" / "demo.py").read_text()
    cells = {"1_line": TEXT, "20_lines": "\n".join(demo.splitlines()[:20]), "100_lines": demo}
    for label, code in cells.items():
        figures = interleaved(
            {
                f"analysis_{label}": lambda code=code: analyze(code),
                f"ast_parse_{label}": lambda code=code: ast.parse(code),
            },
            max(50, n // 10),
        )
        results.update(figures)
        ratios[f"analysis_{label}_over_ast_parse"] = (
            figures[f"analysis_{label}"]["p50_ms"] / figures[f"ast_parse_{label}"]["p50_ms"]
        )


def tool_overhead(results: Figures, ratios: dict[str, float], n: int) -> None:
    print("tool-call overhead on top of run_code: text result and chart", flush=True)
    with Sandbox() as sbx:
        for _ in range(20):
            sbx.run_code(TEXT)
        sbx.run_code(CHART)
        figures = end_to_end(sbx, TEXT, "text", n)
        figures |= end_to_end(sbx, CHART, "chart", max(20, n // 20))
        text, chart = sbx.run_code(TEXT), sbx.run_code(CHART)
    assert text.text == "2" and chart.results and chart.results[0].png, (text, chart)
    figures |= conversion_only(text, TEXT, "text", n)
    figures |= conversion_only(chart, CHART, "chart", n)
    results.update(figures)
    analysis_cost(results, ratios, n)
    for label in ("text", "chart"):
        base = figures[f"tool_run_code_{label}"]["p50_ms"]
        for api in ("anthropic", "openai_chat", "openai_responses"):
            ratios[f"tool_call_{api}_{label}_over_run_code"] = (
                figures[f"tool_call_{api}_{label}"]["p50_ms"] / base
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="samples per text case")
    args = parser.parse_args()
    results: Figures = {}
    ratios: dict[str, float] = {}
    tool_overhead(results, ratios, args.n)
    print(f"\n{'figure':<42} {'p50 ms':>9} {'p99 ms':>9} {'n':>6}")
    for name, v in results.items():
        print(f"{name:<42} {v['p50_ms']:9.3f} {v['p99_ms']:9.3f} {int(v['n']):6d}")
    print("\ndifference of medians, tool call minus run_code (same run, interleaved):")
    for label in ("text", "chart"):
        base = results[f"tool_run_code_{label}"]["p50_ms"]
        for api in ("anthropic", "openai_chat", "openai_responses"):
            diff = results[f"tool_call_{api}_{label}"]["p50_ms"] - base
            print(f"  {api:<17} {label:<6} {diff:+.3f} ms  ({ratios[f'tool_call_{api}_{label}_over_run_code']:.3f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
