"""The data-analysis agent: the CSV is uploaded to the sandbox, the model writes pandas
and matplotlib/seaborn code that runs there, looks at its own charts, and explains.

    ANTHROPIC_API_KEY=... .venv/bin/python examples/data_agent.py sales.csv "Which region grows fastest?"
    (or OPENAI_API_KEY=...; CODECAGE_MODEL picks the model; charts land in ./agent-charts/)
"""

from __future__ import annotations

import sys
from pathlib import Path

from codecage import Policy, SandboxError
from codecage.agents import ToolCall, data_agent


def show(kind: str, call: ToolCall) -> None:
    if kind == "call":
        print(f"--- running in the sandbox:\n{call.code}")
    else:
        print(f"--- {call.status}" + (f", {call.images} chart(s)" if call.images else ""))


def main() -> int:
    if len(sys.argv) < 3:
        print("usage: data_agent.py FILE.csv QUESTION", file=sys.stderr)
        return 2
    try:
        result = data_agent(
            sys.argv[1],
            " ".join(sys.argv[2:]),
            policy=Policy(memory_mb=1024, timeout_s=60),  # room for seaborn and a big frame
            on_event=show,
        )
    except SandboxError as exc:  # unreadable file, no API key, no SDK, or an API failure
        print(exc, file=sys.stderr)
        return 2
    print(f"\n{result.answer}")
    out = Path("agent-charts")
    for i, png in enumerate(result.charts, 1):
        out.mkdir(exist_ok=True)
        (out / f"chart-{i}.png").write_bytes(png)
        print(f"chart: {out / f'chart-{i}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
