"""Tool definitions and a handler for LLM agents: `execute_python` for the Anthropic
Messages API and for OpenAI (Chat Completions and Responses), backed by codecage sessions.

    from codecage.tools import CodeTool, anthropic_tool
    tool = CodeTool()                                  # one sandbox per conversation
    client.messages.create(..., tools=[anthropic_tool()])
    result_block = tool.anthropic_result(tool_use_block, conversation="chat-42")

The sandbox's output and codecage's own status are kept apart: the tool result's text is
a JSON object in which everything the code printed is a string value, so printed text can
never pass itself off as codecage's `status` line. Charts come back as image blocks.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._errors import ApprovalDenied, CodeRejected
from ._models import Execution
from ._policy import Policy
from ._sandbox import Sandbox

TOOL_NAME = "execute_python"
DESCRIPTION = (
    "Run Python code in a persistent, isolated sandbox (no network, limited memory and time). "
    "Variables, imports and files persist between calls in this conversation. numpy, pandas, "
    "matplotlib, seaborn, scipy and scikit-learn are installed. The value of the last "
    "expression is returned; figures are returned as images; files live in /home/user."
)
INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "description": "Python code to run"},
        "timeout": {
            "type": "number",
            "description": "seconds before the run is interrupted (at most the sandbox's limit)",
        },
    },
    "required": ["code"],
    "additionalProperties": False,
}


def anthropic_tool() -> dict[str, Any]:
    """The tool for the Anthropic Messages API (`tools=[...]`)."""
    return {"name": TOOL_NAME, "description": DESCRIPTION, "input_schema": INPUT_SCHEMA}


def openai_chat_tool() -> dict[str, Any]:
    """The tool for OpenAI Chat Completions (`tools=[...]`)."""
    return {
        "type": "function",
        "function": {"name": TOOL_NAME, "description": DESCRIPTION, "parameters": INPUT_SCHEMA},
    }


def openai_responses_tool() -> dict[str, Any]:
    """The tool for the OpenAI Responses API (`tools=[...]`)."""
    return {
        "type": "function",
        "name": TOOL_NAME,
        "description": DESCRIPTION,
        "parameters": INPUT_SCHEMA,
        "strict": False,
    }


@dataclass
class ToolOutput:
    """What a tool call produced: a JSON text (sandbox output and codecage's status kept
    apart), PNG images (base64), and whether it is an error."""

    text: str
    images: list[str] = field(default_factory=list)
    is_error: bool = False


def render(ex: Execution) -> ToolOutput:
    report: dict[str, Any] = {"stdout": "".join(ex.logs.stdout)}
    if ex.logs.stderr:
        report["stderr"] = "".join(ex.logs.stderr)
    if ex.text is not None:
        report["result"] = ex.text
    if ex.error is not None:
        report["error"] = ex.error.traceback or f"{ex.error.name}: {ex.error.value}"
    status = []
    if ex.killed_by:
        status.append(f"the code was stopped by codecage: {ex.killed_by}")
    if ex.state_lost:
        status.append("the session was restarted: earlier variables are gone")
    if ex.truncated:
        status.append("output was cut at the sandbox's output limit")
    if status:
        report["status"] = "; ".join(status)
    images = [r.png for r in ex.results if r.png]
    return ToolOutput(
        json.dumps(report, ensure_ascii=False), images, ex.error is not None or bool(ex.killed_by)
    )


def anthropic_block(tool_use_id: str, out: ToolOutput) -> dict[str, Any]:
    """A `tool_result` content block (Anthropic Messages) carrying `out`."""
    content: list[dict[str, Any]] = [{"type": "text", "text": out.text}]
    content += [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}
        for png in out.images
    ]
    return {
        "type": "tool_result",
        "tool_use_id": tool_use_id,
        "content": content,
        "is_error": out.is_error,
    }


def openai_chat_messages(tool_call_id: str, out: ToolOutput) -> list[dict[str, Any]]:
    """The `tool` message (Chat Completions) carrying `out`, then, since tool messages carry
    text only, a user message with the images if there are any."""
    messages: list[dict[str, Any]] = [
        {"role": "tool", "tool_call_id": tool_call_id, "content": out.text}
    ]
    if out.images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": f"Images produced by {TOOL_NAME}:"}]
        parts += [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}
            for png in out.images
        ]
        messages.append({"role": "user", "content": parts})
    return messages


def openai_responses_item(call_id: str, out: ToolOutput) -> dict[str, Any]:
    """A `function_call_output` input item (Responses API) carrying `out`."""
    output: list[dict[str, Any]] = [{"type": "input_text", "text": out.text}]
    output += [
        {"type": "input_image", "image_url": f"data:image/png;base64,{png}"} for png in out.images
    ]
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def parse_arguments(arguments: Any) -> tuple[str, float | None]:
    """`code` and `timeout` from a call's arguments, or ValueError saying what is wrong."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as exc:
            raise ValueError(f"the arguments are not valid JSON ({exc})") from None
    if not isinstance(arguments, dict):
        raise ValueError('the arguments must be a JSON object, e.g. {"code": "print(1)"}')
    code, timeout = arguments.get("code"), arguments.get("timeout")
    if code is None:
        raise ValueError('"code" is missing: give the Python code to run as a string')
    if not isinstance(code, str):
        raise ValueError(f'"code" must be a string, not {type(code).__name__}')
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not 0 < timeout < float("inf")
    ):
        raise ValueError('"timeout" must be a positive number of seconds')
    return code, timeout


class CodeTool:
    """Handles `execute_python` calls; one sandbox per conversation, created on first use."""

    def __init__(self, policy: Policy | None = None, sandbox: Callable[..., Any] = Sandbox) -> None:
        self.policy = policy
        self._make = sandbox
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def session(self, conversation: str) -> Any:
        with self._lock:
            sandbox = self._sessions.get(conversation)
            if sandbox is None or not getattr(sandbox, "alive", True):
                sandbox = self._make(self.policy)
                self._sessions[conversation] = sandbox
            return sandbox

    def run(self, arguments: dict[str, Any] | str, conversation: str = "default") -> ToolOutput:
        """Run one call's arguments (a dict, or the JSON string OpenAI sends). Arguments the
        schema does not allow come back as a tool error the model can read and correct."""
        try:
            code, timeout = parse_arguments(arguments)
        except ValueError as exc:
            status = f"invalid arguments for {TOOL_NAME}: {exc}"
            return ToolOutput(json.dumps({"status": status}), [], True)
        try:
            ex = self.session(conversation).run_code(code, timeout=timeout)
        except (CodeRejected, ApprovalDenied) as exc:  # the code never ran: say why, plainly
            return ToolOutput(
                json.dumps({"status": f"codecage did not run the code: {exc}"}), [], True
            )
        return render(ex)

    def anthropic_result(self, tool_use: Any, conversation: str = "default") -> dict[str, Any]:
        """A `tool_result` content block for a `tool_use` block (object or dict)."""
        block = tool_use if isinstance(tool_use, dict) else tool_use.model_dump()
        return anthropic_block(block["id"], self.run(block["input"], conversation))

    def openai_chat_result(
        self, tool_call: Any, conversation: str = "default"
    ) -> list[dict[str, Any]]:
        """The `tool` message for a Chat Completions tool call, then (tool messages carry text
        only) a user message with the images, if there are any."""
        call = tool_call if isinstance(tool_call, dict) else tool_call.model_dump()
        return openai_chat_messages(
            call["id"], self.run(call["function"]["arguments"], conversation)
        )

    def openai_responses_result(
        self, function_call: Any, conversation: str = "default"
    ) -> dict[str, Any]:
        """A `function_call_output` input item for a Responses API function call."""
        call = function_call if isinstance(function_call, dict) else function_call.model_dump()
        return openai_responses_item(call["call_id"], self.run(call["arguments"], conversation))

    def reset(self, conversation: str = "default") -> None:
        with self._lock:
            sandbox = self._sessions.pop(conversation, None)
        if sandbox is not None:
            sandbox.kill()

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for sandbox in sessions:
            sandbox.kill()

    def __enter__(self) -> CodeTool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
