"""The math agent: every calculation is done by code in a codecage sandbox.

ANTHROPIC_API_KEY=... .venv/bin/python examples/math_agent.py "What is 2**100?"
(or OPENAI_API_KEY=...; CODECAGE_MODEL picks the model)
"""

from __future__ import annotations

import sys

from codecage import SandboxError
from codecage.agents import ToolCall, math_agent


def show(kind: str, call: ToolCall) -> None:
    if kind == "call":
        print(f"--- running in the sandbox:\n{call.code}")
    else:
        print(f"--- {call.status}: {call.output}")


def main() -> int:
    question = " ".join(sys.argv[1:]) or "What is 2**100, and how many digits does it have?"
    try:
        result = math_agent(question, on_event=show)
    except SandboxError as exc:  # no API key, no SDK, or the model's API failed
        print(exc, file=sys.stderr)
        return 2
    print(f"\n{result.answer}\n({len(result.calls)} tool calls, {result.provider} {result.model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
