"""The two example agents as library entry points: a data-analysis agent and a math agent.

    from codecage.agents import data_agent, math_agent
    result = math_agent("What is 2**100?")            # ANTHROPIC_API_KEY or OPENAI_API_KEY
    result = data_agent("sales.csv", "Which region sells most? Draw it.")
    result.answer, result.calls, result.charts        # text, the tool calls, PNG bytes

Both share one loop: ask the model, run every `execute_python` call it makes in a sandbox
created for this agent run (and always killed at the end), send the results back (charts
as images), until the model answers without a tool call or `max_turns` is reached. The
model's code runs only in the jail; the host only converts (codecage.tools). The provider
SDKs (`anthropic`, `openai`) are imported only when an agent runs, so codecage does not
need them otherwise (`pip install 'codecage[agents]'`).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ._errors import SandboxError
from ._policy import Policy
from .tools import (
    TOOL_NAME,
    CodeTool,
    ToolOutput,
    anthropic_block,
    anthropic_tool,
    openai_chat_messages,
    openai_chat_tool,
    openai_responses_item,
    openai_responses_tool,
)

# "openai" speaks Chat Completions (as every OpenAI-compatible server does);
# "openai-responses" the Responses API. Chosen by key: the first two, in this order.
PROVIDERS = ("anthropic", "openai", "openai-responses")
# Current general models as named by the pinned SDKs; --model or CODECAGE_MODEL overrides.
DEFAULT_MODELS = {
    "anthropic": "claude-sonnet-5-5",
    "openai": "gpt-5.5",
    "openai-responses": "gpt-5.5",
}
KEYS = {
    "anthropic": "ANTHROPIC_API_KEY",
    "openai": "OPENAI_API_KEY",
    "openai-responses": "OPENAI_API_KEY",
}
WORKSPACE = "/home/user"

DATA_SYSTEM = (
    "You are a data analyst. Answer the user's question about their data file by writing "
    f"Python and running it with the {TOOL_NAME} tool: load the file with pandas, check its "
    "columns and types before relying on them, compute the answer, and visualise it with "
    "matplotlib or seaborn when a chart helps (show the figure; it comes back to you as an "
    "image). State numbers only as the code computed them. Finish with a short explanation "
    "of what you found and how."
)
MATH_SYSTEM = (
    "You are a careful mathematician. Never compute in your head: every calculation, however "
    f"small, is done by Python code run with the {TOOL_NAME} tool (Python's integers are "
    "exact; use fractions.Fraction or decimal where floats would round; numpy and scipy are "
    "there for the rest). Then answer with the result the code printed and a sentence or two "
    "on how it was obtained."
)


class AgentError(SandboxError):
    """An agent cannot run: no API key, a missing SDK, or the model's API failed."""


@dataclass
class ToolCall:
    """One `execute_python` call: the code (or the raw arguments, if they were not valid),
    how it ended (`ok`, `error`, or codecage's status line), and the result sent back."""

    code: str
    status: str = "running"
    output: str = ""
    images: int = 0


@dataclass
class AgentResult:
    """The final answer, every tool call in order, and the charts (PNG bytes)."""

    answer: str
    calls: list[ToolCall] = field(default_factory=list)
    charts: list[bytes] = field(default_factory=list)
    provider: str = ""
    model: str = ""
    turns: int = 0
    stop_reason: str = "answer"  # or "max_turns": the model never stopped calling the tool


OnEvent = Callable[[str, ToolCall], None]  # ("call", call) before it runs, ("result", call) after


class _Chat(Protocol):
    """One provider's side of the loop: the conversation in that API's shapes."""

    def ask(self) -> tuple[str, list[tuple[str, Any]]]:
        """Send the conversation; return the model's text and its calls as (id, arguments)."""
        ...

    def answer(self, results: list[tuple[str, ToolOutput]]) -> None:
        """Append the tool results (call id, output) to the conversation."""
        ...


def choose_provider(client: Any = None, provider: str | None = None) -> str:
    """The provider: forced, else the client's own package, else whichever key is set."""
    if provider is not None:
        if provider not in PROVIDERS:
            raise AgentError(f"unknown provider {provider!r}: use one of {', '.join(PROVIDERS)}")
        return provider
    if client is not None:
        package = type(client).__module__.split(".")[0]
        if package in PROVIDERS:
            return package  # an OpenAI client speaks Chat Completions unless told otherwise
        raise AgentError(f"cannot tell the provider of a {type(client).__name__}: pass provider=")
    for name in PROVIDERS[:2]:
        if os.environ.get(KEYS[name]):
            return name
    raise AgentError(
        "set ANTHROPIC_API_KEY or OPENAI_API_KEY (the agent needs a model: Anthropic is used "
        "when its key is set, else OpenAI; --provider forces one, --model or CODECAGE_MODEL "
        "picks the model)"
    )


def make_client(provider: str) -> Any:
    """A client of the provider's official SDK, reading its key from the environment."""
    if not os.environ.get(KEYS[provider]):
        raise AgentError(f"set {KEYS[provider]} to use the {provider} provider")
    try:
        if provider == "anthropic":
            import anthropic

            return anthropic.Anthropic()
        import openai

        return openai.OpenAI()
    except ImportError:
        raise AgentError(
            f"the {provider} package is not installed: pip install 'codecage[agents]'"
        ) from None


class _Anthropic:
    def __init__(self, client: Any, model: str, system: str, prompt: str) -> None:
        self.client, self.model, self.system = client, model, system
        self.messages: list[Any] = [{"role": "user", "content": prompt}]

    def ask(self) -> tuple[str, list[tuple[str, Any]]]:
        reply = self.client.messages.create(
            model=self.model,
            max_tokens=4096,
            system=self.system,
            tools=[anthropic_tool()],
            messages=self.messages,
        )
        self.messages.append(reply.to_param())
        text = "".join(b.text for b in reply.content if b.type == "text")
        calls = [(b.id, _named(b.name, b.input)) for b in reply.content if b.type == "tool_use"]
        return text, calls

    def answer(self, results: list[tuple[str, ToolOutput]]) -> None:
        blocks = [anthropic_block(call_id, out) for call_id, out in results]
        self.messages.append({"role": "user", "content": blocks})


class _OpenAIChat:
    """OpenAI Chat Completions: the API every OpenAI-compatible server speaks too."""

    def __init__(self, client: Any, model: str, system: str, prompt: str) -> None:
        self.client, self.model = client, model
        self.messages: list[dict[str, Any]] = [
            {"role": "system", "content": system},
            {"role": "user", "content": prompt},
        ]

    def ask(self) -> tuple[str, list[tuple[str, Any]]]:
        reply = self.client.chat.completions.create(
            model=self.model, messages=self.messages, tools=[openai_chat_tool()]
        )
        message = reply.choices[0].message
        calls = [c for c in message.tool_calls or [] if c.type == "function"]
        said: dict[str, Any] = {"role": "assistant", "content": message.content}
        if calls:
            said["tool_calls"] = [
                {"id": c.id, "type": "function", "function": c.function.model_dump()} for c in calls
            ]
        self.messages.append(said)
        return message.content or "", [
            (c.id, _named(c.function.name, c.function.arguments)) for c in calls
        ]

    def answer(self, results: list[tuple[str, ToolOutput]]) -> None:
        # Every tool message must follow the assistant message directly; images go after.
        produced = [m for call_id, out in results for m in openai_chat_messages(call_id, out)]
        self.messages += [m for m in produced if m["role"] == "tool"]
        self.messages += [m for m in produced if m["role"] != "tool"]


class _OpenAIResponses:
    """The OpenAI Responses API: function outputs carry images themselves."""

    def __init__(self, client: Any, model: str, system: str, prompt: str) -> None:
        self.client, self.model, self.system = client, model, system
        self.input: list[Any] = [{"role": "user", "content": prompt}]

    def ask(self) -> tuple[str, list[tuple[str, Any]]]:
        reply = self.client.responses.create(
            model=self.model,
            instructions=self.system,
            input=self.input,
            tools=[openai_responses_tool()],
        )
        self.input += reply.output  # reasoning items, messages and calls go back as they came
        calls = [i for i in reply.output if i.type == "function_call"]
        return reply.output_text, [(c.call_id, _named(c.name, c.arguments)) for c in calls]

    def answer(self, results: list[tuple[str, ToolOutput]]) -> None:
        self.input += [openai_responses_item(call_id, out) for call_id, out in results]


_CHATS: dict[str, Callable[[Any, str, str, str], _Chat]] = {
    "anthropic": _Anthropic,
    "openai": _OpenAIChat,
    "openai-responses": _OpenAIResponses,
}


def _named(name: str, arguments: Any) -> Any:
    """Arguments for our tool; a call to any other tool gets a readable error instead."""
    return arguments if name == TOOL_NAME else _Unknown(name)


@dataclass
class _Unknown:
    name: str


def _api_errors(provider: str) -> tuple[type[BaseException], ...]:
    try:
        module = __import__(provider.split("-")[0])
    except ImportError:
        return ()
    return (module.APIError,)


def run_agent(
    system: str,
    prompt: str,
    *,
    files: dict[str, bytes] | None = None,
    client: Any = None,
    provider: str | None = None,
    model: str | None = None,
    policy: Policy | None = None,
    on_event: OnEvent | None = None,
    max_turns: int = 12,
) -> AgentResult:
    """The loop both agents share. `files` are uploaded to /home/user before the first turn."""
    if max_turns < 1:
        raise AgentError(f"max_turns must be at least 1, not {max_turns}")
    provider = choose_provider(client, provider)
    client = client if client is not None else make_client(provider)
    model = model or os.environ.get("CODECAGE_MODEL") or DEFAULT_MODELS[provider]
    result = AgentResult("", provider=provider, model=model, stop_reason="max_turns")
    chat = _CHATS[provider](client, model, system, prompt)
    with CodeTool(policy) as tool:
        sandbox = tool.session("agent")  # created now: a broken host fails before the model
        for name, data in (files or {}).items():
            sandbox.files.write(name, data)
        try:
            while result.turns < max_turns:
                result.turns += 1
                text, calls = chat.ask()
                result.answer = text
                if not calls:
                    result.stop_reason = "answer"
                    break
                chat.answer([(cid, _run(tool, args, result, on_event)) for cid, args in calls])
        except _api_errors(provider) as exc:
            raise AgentError(f"the {provider} API failed: {exc}") from exc
    return result


def _run(
    tool: CodeTool, arguments: Any, result: AgentResult, on_event: OnEvent | None
) -> ToolOutput:
    """Run one call, keeping the transcript and the charts; tell `on_event` before and after."""
    call = ToolCall(code=_code_of(arguments))
    result.calls.append(call)
    if on_event:
        on_event("call", call)
    if isinstance(arguments, _Unknown):
        status = f"there is no tool {arguments.name!r}: the only tool is {TOOL_NAME}"
        out = ToolOutput(json.dumps({"status": status}), [], True)
    else:
        out = tool.run(arguments, "agent")
    report = json.loads(out.text)
    call.status = report.get("status") or ("error" if out.is_error else "ok")
    call.output, call.images = out.text, len(out.images)
    result.charts += [base64.b64decode(png) for png in out.images]
    if on_event:
        on_event("result", call)
    return out


def _code_of(arguments: Any) -> str:
    """The code of a call, for the transcript; the raw arguments if there is none."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return str(arguments)
    if isinstance(arguments, dict) and isinstance(arguments.get("code"), str):
        return str(arguments["code"])
    return repr(arguments)


def data_agent(
    csv_path: str | os.PathLike[str],
    question: str,
    *,
    client: Any = None,
    provider: str | None = None,
    model: str | None = None,
    policy: Policy | None = None,
    on_event: OnEvent | None = None,
    max_turns: int = 12,
) -> AgentResult:
    """Answer `question` about the user's file: uploaded to /home/user/<name>, analysed with
    pandas, charted with matplotlib/seaborn, explained."""
    path = Path(csv_path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AgentError(f"cannot read {path}: {exc.strerror}") from None
    prompt = (
        f"My data file is at {WORKSPACE}/{path.name} ({len(data):,} bytes, uploaded for you)."
        f"\n\n{question}"
    )
    return run_agent(
        DATA_SYSTEM,
        prompt,
        files={path.name: data},
        client=client,
        provider=provider,
        model=model,
        policy=policy,
        on_event=on_event,
        max_turns=max_turns,
    )


def math_agent(
    question: str,
    *,
    client: Any = None,
    provider: str | None = None,
    model: str | None = None,
    policy: Policy | None = None,
    on_event: OnEvent | None = None,
    max_turns: int = 12,
) -> AgentResult:
    """Answer a math question by computing every step with code, never in the model's head."""
    return run_agent(
        MATH_SYSTEM,
        question,
        client=client,
        provider=provider,
        model=model,
        policy=policy,
        on_event=on_event,
        max_turns=max_turns,
    )
