"""The example agents, end to end but for the model: the real `anthropic` and `openai`
clients, whose HTTP transport replays scripted model turns (in the APIs' real shapes,
checked with the SDKs' own types) and records every request the agent sends; the tool
calls run in real sandboxes."""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from anthropic.types import Message
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
from openai.types.chat import ChatCompletion
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming
from openai.types.responses import Response
from openai.types.responses.response_create_params import ResponseCreateParamsNonStreaming
from pydantic import TypeAdapter, ValidationError

from codecage import Policy
from codecage.agents import DEFAULT_MODELS, AgentError, data_agent, make_client, math_agent
from codecage.tools import anthropic_tool, openai_chat_tool, openai_responses_tool

pytestmark = pytest.mark.requires_root
POLICY = Policy(timeout_s=20, interrupt_grace_s=0.5)
ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TWO_TO_100 = "1267650600228229401496703205376"


def consume(value: Any) -> Any:
    """Validated TypedDicts keep `Iterable` fields as lazy validators: walk them so every
    nested item is actually checked."""
    if isinstance(value, dict):
        return {k: consume(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or hasattr(value, "__next__"):
        return [consume(v) for v in value]
    return value


API: dict[str, tuple[Any, Any, str]] = {
    "anthropic": (MessageCreateParamsNonStreaming, Message, "/v1/messages"),
    "openai": (CompletionCreateParamsNonStreaming, ChatCompletion, "/v1/chat/completions"),
    "openai-responses": (ResponseCreateParamsNonStreaming, Response, "/v1/responses"),
}


class Script:
    """A scripted model for one provider: the turns it replies with, and the requests the
    agent sent it (parsed JSON bodies, each validated as that API's request type)."""

    def __init__(self, provider: str, turns: list[dict[str, Any]]) -> None:
        self.provider, self.turns, self.requests = provider, list(turns), []
        request_type, response_type, self.path = API[provider]
        # kept alive: the lazy validators of its Iterable fields need its schema
        self.request_type: TypeAdapter[Any] = TypeAdapter(request_type)
        for turn in self.turns:
            response_type.model_validate(turn)  # a real shape, or the test is wrong

    def reply(self, body: dict[str, Any]) -> dict[str, Any]:
        consume(self.request_type.validate_python(body))
        self.answers_every_call(body.get("messages") or body["input"])
        self.requests.append(body)
        return self.turns.pop(0)

    def answers_every_call(self, messages: list[dict[str, Any]]) -> None:
        """The APIs' own rule: the results of an assistant turn's tool calls come right
        after it (Anthropic: in the next user message; Chat Completions: as the next
        messages; Responses: a function_call_output for every function_call)."""
        if self.provider == "openai-responses":
            asked = [m["call_id"] for m in messages if m.get("type") == "function_call"]
            answered = [m["call_id"] for m in messages if m.get("type") == "function_call_output"]
            assert answered == asked, messages
            return
        for i, message in enumerate(messages[:-1]):
            if message["role"] != "assistant":
                continue
            if self.provider == "anthropic":
                asked = [b["id"] for b in message["content"] if b["type"] == "tool_use"]
                following = messages[i + 1]["content"]
                answered = [b["tool_use_id"] for b in following if b["type"] == "tool_result"]
            else:
                asked = [c["id"] for c in message.get("tool_calls") or []]
                following = messages[i + 1 : i + 1 + len(asked)]
                answered = [m.get("tool_call_id") for m in following]
            assert answered == asked, (asked, messages[i + 1 :])

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == self.path, request.url
        return httpx2.Response(200, json=self.reply(json.loads(request.content)))

    def client(self) -> Any:
        http = httpx2.Client(transport=httpx2.MockTransport(self.handler))
        if self.provider == "anthropic":
            return anthropic.Anthropic(
                api_key="test", base_url="http://model.test", http_client=http, max_retries=0
            )
        return openai.OpenAI(
            api_key="test", base_url="http://model.test/v1", http_client=http, max_retries=0
        )

    def tool_results(self, index: int) -> tuple[list[dict[str, Any]], list[bytes], list[bool]]:
        """What request `index` carried back from the tools: the JSON reports, the images
        (decoded PNG bytes) and, for Anthropic, the is_error flags."""
        body = self.requests[index]
        reports, images, errors = [], [], []
        if self.provider == "anthropic":
            last = body["messages"][-1]
            assert last["role"] == "user"
            for block in last["content"]:
                assert block["type"] == "tool_result"
                errors.append(block["is_error"])
                for part in block["content"]:
                    if part["type"] == "text":
                        reports.append(json.loads(part["text"]))
                    else:
                        images.append(base64.b64decode(part["source"]["data"]))
            return reports, images, errors
        prefix = "data:image/png;base64,"
        if self.provider == "openai-responses":
            items = body["input"]
            last = max(i for i, m in enumerate(items) if m.get("type") != "function_call_output")
            for item in items[last + 1 :]:  # this turn's outputs: those after its calls
                if item.get("type") == "function_call_output":
                    for part in item["output"]:
                        if part["type"] == "input_text":
                            reports.append(json.loads(part["text"]))
                        else:
                            assert part["image_url"].startswith(prefix)
                            images.append(base64.b64decode(part["image_url"][len(prefix) :]))
            return reports, images, errors
        messages = body["messages"]
        start = max(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1
        for message in messages[start:]:
            if message["role"] == "tool":
                reports.append(json.loads(message["content"]))
            else:
                for part in message["content"][1:]:
                    assert part["image_url"]["url"].startswith(prefix)
                    images.append(base64.b64decode(part["image_url"]["url"][len(prefix) :]))
        return reports, images, errors


def tool_turn(provider: str, *calls: Any) -> dict[str, Any]:
    """A model turn calling tools: each call is code (str), or raw arguments (a dict for
    Anthropic; a dict or a JSON text for OpenAI), or (tool name, arguments)."""
    named = [c if isinstance(c, tuple) else ("execute_python", c) for c in calls]
    ids = [f"call_{next(IDS)}" for _ in named]
    if provider == "anthropic":
        content: list[dict[str, Any]] = [{"type": "text", "text": "I will compute it."}]
        content += [
            {"type": "tool_use", "id": i, "name": name, "input": _object(args)}
            for i, (name, args) in zip(ids, named, strict=True)
        ]
        return anthropic_message(content, "tool_use")
    if provider == "openai-responses":
        items = [
            {
                "type": "function_call",
                "id": f"fc_{i}",
                "call_id": i,
                "name": name,
                "arguments": _arguments(args),
                "status": "completed",
            }
            for i, (name, args) in zip(ids, named, strict=True)
        ]
        return response(items)
    tool_calls = [
        {"id": i, "type": "function", "function": {"name": name, "arguments": _arguments(args)}}
        for i, (name, args) in zip(ids, named, strict=True)
    ]
    return chat_completion({"role": "assistant", "content": None, "tool_calls": tool_calls})


IDS = itertools.count()


def _object(args: Any) -> Any:
    return {"code": args} if isinstance(args, str) else args


def _arguments(args: Any) -> str:
    if isinstance(args, dict):
        return json.dumps(args)
    return str(args) if args.startswith("{") else json.dumps({"code": args})


def final_turn(provider: str, text: str) -> dict[str, Any]:
    if provider == "anthropic":
        return anthropic_message([{"type": "text", "text": text}], "end_turn")
    if provider == "openai-responses":
        message = {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        return response([message])
    return chat_completion({"role": "assistant", "content": text})


def response(output: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1_800_000_000,
        "model": "gpt-test",
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [openai_responses_tool()],
        "status": "completed",
    }


def anthropic_message(content: list[dict[str, Any]], stop: str) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 10},
    }


def chat_completion(message: dict[str, Any]) -> dict[str, Any]:
    finish = "tool_calls" if message.get("tool_calls") else "stop"
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_800_000_000,
        "model": "gpt-test",
        "choices": [{"index": 0, "finish_reason": finish, "message": message, "logprobs": None}],
    }


PROVIDERS = ["anthropic", "openai", "openai-responses"]
TOOLS = {
    "anthropic": anthropic_tool(),
    "openai": openai_chat_tool(),
    "openai-responses": openai_responses_tool(),
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_math_agent_computes_in_the_jail(provider: str) -> None:
    hostname = "import socket; print(socket.gethostname())"
    assert socket.gethostname() != "sandbox"  # control: the host's name is not the jail's
    script = Script(
        provider,
        [
            tool_turn(provider, "print(2**100)", hostname),
            final_turn(provider, f"2**100 = {TWO_TO_100}"),
        ],
    )
    events: list[tuple[str, str]] = []
    result = math_agent(
        "What is 2**100?",
        client=script.client(),
        provider=provider,
        model="test-model",
        policy=POLICY,
        on_event=lambda kind, call: events.append((kind, call.code)),
    )
    assert result.answer == f"2**100 = {TWO_TO_100}" and result.stop_reason == "answer"
    assert result.provider == provider and result.turns == 2
    assert [(c.code, c.status) for c in result.calls] == [("print(2**100)", "ok"), (hostname, "ok")]
    two = [("call", "print(2**100)"), ("result", "print(2**100)")]
    assert events == [*two, ("call", hostname), ("result", hostname)]
    first = script.requests[0]
    assert first["model"] == "test-model"
    assert first["tools"] == [TOOLS[provider]]
    system = first.get("system") or first.get("instructions") or first["messages"][0]["content"]
    assert "Never compute in your head" in system
    reports, images, errors = script.tool_results(1)
    assert [r["stdout"] for r in reports] == [f"{TWO_TO_100}\n", "sandbox\n"]
    assert images == [] and errors in ([], [False, False])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_data_agent_reads_the_upload_and_sends_the_chart_back(
    provider: str, tmp_path: Path
) -> None:
    rows = [("north", 3), ("south", 5), ("north", 4), ("east", 1)]
    buf = io.StringIO()
    csv.writer(buf).writerows([("region", "units"), *rows])
    (tmp_path / "sales.csv").write_text(buf.getvalue())
    totals = {"east": 1, "north": 7, "south": 5}  # what pandas must find in the upload
    code = (
        "import pandas as pd, matplotlib.pyplot as plt\n"
        "df = pd.read_csv('/home/user/sales.csv')\n"
        "totals = df.groupby('region').units.sum()\n"
        "print(totals.to_dict())\n"
        "totals.plot.bar(); plt.show()\n"
    )
    count = "print(len(df))"  # a second call in the same turn, after the chart
    script = Script(
        provider, [tool_turn(provider, code, count), final_turn(provider, "North leads.")]
    )
    result = data_agent(
        tmp_path / "sales.csv",
        "Which region sells most?",
        client=script.client(),
        provider=provider,
        policy=POLICY,
    )
    assert result.answer == "North leads." and result.stop_reason == "answer"
    first = json.dumps(script.requests[0])
    assert "/home/user/sales.csv" in first and "Which region sells most?" in first
    reports, images, _ = script.tool_results(1)
    assert [r["stdout"] for r in reports] == [f"{totals}\n", "4\n"]
    assert len(images) == 1 and images[0].startswith(PNG_MAGIC)
    assert result.charts == images and result.calls[0].images == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_malformed_tool_calls_get_readable_errors_and_the_loop_goes_on(provider: str) -> None:
    bad: list[Any] = [{}, {"code": 5}, ("web_search", {"query": "2**100"})]
    if provider != "anthropic":
        bad.append("{not json")
    script = Script(
        provider,
        [
            tool_turn(provider, *bad),
            tool_turn(provider, "print(6 * 7)"),
            final_turn(provider, "42"),
        ],
    )
    result = math_agent("6 times 7?", client=script.client(), provider=provider, policy=POLICY)
    assert result.answer == "42" and len(script.requests) == 3
    reports, _, errors = script.tool_results(1)
    assert len(reports) == len(bad) and all(set(r) == {"status"} for r in reports)
    assert "invalid arguments" in reports[0]["status"] and "code" in reports[0]["status"]
    assert "must be a string" in reports[1]["status"]
    assert "no tool 'web_search'" in reports[2]["status"]
    assert errors in ([], [True] * len(bad))
    assert [c.status for c in result.calls[: len(bad)]] == [r["status"] for r in reports]
    assert script.tool_results(2)[0] == [{"stdout": "42\n"}]


def test_the_loop_stops_at_max_turns() -> None:
    turns = [tool_turn("anthropic", f"print({i})") for i in range(3)]
    script = Script("anthropic", turns)
    result = math_agent("count", client=script.client(), policy=POLICY, max_turns=2)
    assert result.stop_reason == "max_turns" and result.turns == 2 and len(result.calls) == 2
    assert len(script.turns) == 1  # the third turn was never asked for


def test_an_api_failure_is_a_clear_error_and_the_sandbox_is_killed() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        error = {"type": "overloaded_error", "message": "Overloaded"}
        return httpx2.Response(529, json={"type": "error", "error": error})

    client = anthropic.Anthropic(
        api_key="test",
        base_url="http://model.test",
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
        max_retries=0,
    )
    with pytest.raises(AgentError, match=r"the anthropic API failed: .*Overloaded"):
        math_agent("1+1?", client=client, policy=POLICY)
    # the leak check after this test proves the agent's sandbox is gone


def test_the_request_checker_can_fail() -> None:
    script = Script("anthropic", [])
    with pytest.raises(ValidationError):
        script.reply(
            {
                "model": "m",
                "max_tokens": 1,
                "messages": [{"role": "tool", "content": "x"}],  # not an Anthropic role
            }
        )
    nested = {"type": "tool_result", "content": "no tool_use_id"}  # deep in an Iterable
    with pytest.raises(ValidationError):
        script.reply(
            {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [nested]}]}
        )
    with pytest.raises(ValidationError):
        Script("openai", [anthropic_message([], "end_turn")])


def test_a_missing_sdk_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    assert isinstance(make_client("openai"), openai.OpenAI)  # control: installed, it works
    monkeypatch.setitem(sys.modules, "openai", None)  # what `import openai` meets if absent
    with pytest.raises(AgentError, match=r"pip install 'codecage\[agents\]'"):
        math_agent("1+1?", provider="openai")


# -- the CLI --------------------------------------------------------------------------------


def codecage(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "codecage", "agent", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def clean_env(**extra: str) -> dict[str, str]:
    """No API key from the caller's environment, only what the test sets."""
    keep = ("PATH", "CODECAGE_RUNTIME", "HOME", "LANG")
    return {k: v for k, v in os.environ.items() if k in keep} | extra


def test_cli_without_a_key_says_what_to_set(tmp_path: Path) -> None:
    proc = codecage("math", "What is 2**100?", env=clean_env(), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("codecage: set ANTHROPIC_API_KEY or OPENAI_API_KEY (")
    assert "Traceback" not in proc.stderr
    proc = codecage("data", "missing.csv", "q?", env=clean_env(), cwd=tmp_path)
    assert proc.returncode == 2 and "cannot read missing.csv" in proc.stderr
    proc = codecage("math", "q", "--provider", "openai", env=clean_env(), cwd=tmp_path)
    assert proc.returncode == 2 and "set OPENAI_API_KEY" in proc.stderr


KEY = "sk-canary-7f3a"  # the API key the CLI gets; the sandbox must never see it
CLI_CODE = (
    "import os, matplotlib.pyplot as plt\n"
    "plt.plot([1, 3]); print(2**100)\n"
    f"print([k for k, v in os.environ.items() if {KEY!r} in v], {KEY!r} in str(os.environ))\n"
)


@pytest.fixture
def model_server() -> Iterator[tuple[str, Script]]:
    """A scripted OpenAI-compatible model on loopback, for the CLI (its own process)."""
    script = Script(
        "openai",
        [
            tool_turn("openai", CLI_CODE),
            final_turn("openai", f"It is {TWO_TO_100}."),
        ],
    )

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body["authorization"] = self.headers["Authorization"]  # recorded, not validated
            data = json.dumps(script.reply(body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", script
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_cli_prints_progress_then_the_answer_and_saves_charts(
    tmp_path: Path, model_server: tuple[str, Script]
) -> None:
    url, script = model_server
    env = clean_env(OPENAI_API_KEY=KEY, OPENAI_BASE_URL=url)
    proc = codecage("math", "What is 2**100?", "--save-charts", "out", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "[1] execute_python\n  | import os, matplotlib.pyplot as plt\n" in proc.stderr
    assert f"  > {TWO_TO_100}\n  > [] False\n  = ok, 1 image(s)\n" in proc.stderr
    # the key reached the model's API (control) but not the code the model wrote
    assert script.requests[0]["authorization"] == f"Bearer {KEY}"
    assert script.tool_results(1)[0][0]["stdout"] == f"{TWO_TO_100}\n[] False\n"
    chart = tmp_path / "out" / "chart-1.png"
    assert proc.stdout == f"It is {TWO_TO_100}.\n[chart saved to out/chart-1.png]\n"
    assert chart.read_bytes().startswith(PNG_MAGIC)
    assert script.requests[0]["model"] == DEFAULT_MODELS["openai"] and len(script.requests) == 2


@pytest.mark.parametrize("example", ["math_agent.py", "data_agent.py"])
def test_examples_run(example: str, tmp_path: Path, model_server: tuple[str, Script]) -> None:
    url, script = model_server
    (tmp_path / "sales.csv").write_text("region,units\nnorth,3\n")
    args = ["sales.csv", "Which region?"] if example == "data_agent.py" else []
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example), *args],
        capture_output=True,
        text=True,
        env=clean_env(OPENAI_API_KEY="test", OPENAI_BASE_URL=url),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--- running in the sandbox:\nimport os, matplotlib" in proc.stdout
    assert f"\nIt is {TWO_TO_100}.\n" in proc.stdout
    if example == "data_agent.py":
        assert "/home/user/sales.csv" in json.dumps(script.requests[0])
        assert (tmp_path / "agent-charts" / "chart-1.png").read_bytes().startswith(PNG_MAGIC)
