"""The typed protocol: docs/protocol.md and codecage/_inside/messages.py in step (as
docs/openapi.json is with the service), and the kernel's dispatch table."""

from __future__ import annotations

import errno
import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from codecage._inside import files, kernel, messages, procman
from codecage._inside.protocol import FrameReader, encode

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def section(heading: str) -> str:
    """The text under `heading` (a whole heading line), up to the next heading of any level."""
    start = DOC.index(heading + "\n") + len(heading) + 1
    following = re.search(r"^#+ ", DOC[start:], re.MULTILINE)
    return DOC[start : start + following.start()] if following else DOC[start:]


def rows(text: str) -> list[list[str]]:
    """A markdown table's body rows, as cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def top_level(text: str) -> str:
    """`text` without its parenthesised remarks (nested ones too)."""
    while True:
        stripped = re.sub(r"\([^()]*\)", "", text)
        if stripped == text:
            return text
        text = stripped


Fields = dict[str, Any]  # a field's name -> None, or the field names of what it holds


def fields(text: str) -> Fields:
    """The fields a cell names: `name`, `name: {a, b}`, `name: [{a, b}]`."""
    out: Fields = {}
    for span in re.findall(r"`([^`]*)`", top_level(text)):
        nested = re.fullmatch(r"(\w+): \[?\{([^}]*)\}\]?", span)
        if nested:
            out[nested[1]] = {f.strip(): None for f in nested[2].split(",")}
        elif re.fullmatch(r"\w+", span):
            out[span] = None
    return out


def names(cell: str) -> list[str]:
    return re.findall(r"`(\w+)`", cell)


def typed(cls: type[Any], drop: str) -> Fields:
    """A TypedDict's fields (required or not), nested TypedDicts by their own fields."""
    hints = typing.get_type_hints(cls)
    out: Fields = {}
    for name, hint in hints.items():
        if name == drop:
            continue
        inner = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
        out[name] = typed(inner, "") if typing.is_typeddict(inner) else None
    return out


def test_requests_match_the_document() -> None:
    table = {
        names(op)[0]: (args, reply)
        for op, args, reply in rows(section("### Requests (host -> kernel)"))
    }
    assert set(table) == set(messages.REQUESTS), "docs/protocol.md's requests and REQUESTS differ"
    for op, (args, reply) in table.items():
        assert fields(args) == typed(messages.REQUESTS[op], "op"), f"fields of {op!r}"
        said = reply.split("`done` with", 1)
        if op in messages.REPLIES:
            assert "`done`" in reply, f"{op!r} replies done"
            documented = fields(said[1].split(";")[0]) if len(said) == 2 else {}
            assert documented == typed(messages.REPLIES[op], ""), f"done fields of {op!r}"
        else:
            assert "`done`" not in reply, f"{op!r} has no reply type in REPLIES"


def test_events_match_the_document() -> None:
    documented: dict[str, Fields] = {}
    for ev, row_fields, _ in rows(section("### Events (kernel -> host)")):
        for name in names(ev):
            documented[name] = fields(row_fields)
    assert set(documented) == set(messages.EVENTS), "docs/protocol.md's events and EVENTS differ"
    for ev, cls in messages.EVENTS.items():
        assert documented[ev] == typed(cls, "ev"), f"fields of {ev!r}"


def inline_messages(text: str) -> dict[str, set[str]]:
    """The `{"ev": ...}` / `{"op": ...}` messages a section spells out: name -> its keys
    (all the spellings of one name together)."""
    out: dict[str, set[str]] = {}
    for span in re.findall(r"`(\{[^`]*\})`", text):
        head = re.match(r'\{"(ev|op)": "(\w+)"', span)
        if head:
            keys = set(re.findall(r'"(\w+)":', span)) - {head[1]}
            out.setdefault(head[2], set()).update(keys)
    return out


@pytest.mark.parametrize(
    ("heading", "table"),
    [
        ("## Supervisor channel (host <-> init, PID 1 of the sandbox)", messages.SUPERVISOR),
        ("## Set-up (host <-> the set-up process, namespace backend)", messages.SETUP),
    ],
)
def test_supervisor_messages_match_the_document(heading: str, table: dict[str, type[Any]]) -> None:
    documented = inline_messages(section(heading))
    assert set(documented) == set(table)
    for name, cls in table.items():
        keys = set(typing.get_type_hints(cls)) - {"ev", "op"}
        assert documented[name] == keys, f"fields of {name!r}"


def test_process_channel_matches_the_document() -> None:
    table = {
        names(op)[0]: (args, reply)
        for op, args, reply in rows(section("## Process channel (host <-> the process manager)"))
    }
    assert set(table) == set(messages.PROC_REQUESTS) == set(procman.OPS)
    for op, (args, reply) in table.items():
        assert fields(args) == typed(messages.PROC_REQUESTS[op], "op"), f"fields of {op!r}"
        said = reply.split("`done` with", 1)
        documented = fields(said[1].split(";")[0]) if len(said) == 2 else {}
        assert documented == typed(messages.PROC_REPLIES[op], ""), f"done fields of {op!r}"


def test_the_drift_check_sees_a_missing_field() -> None:
    """The parser reads what the table says: a field dropped from a row is noticed."""
    row = '`id`, `code`, `mode` (`"session"` or `"main"`), `envs`, `output_bytes`'
    assert fields(row) != typed(messages.ExecuteRequest, "op")
    assert fields(row + ", `results_bytes`") == typed(messages.ExecuteRequest, "op")


# -- the kernel's dispatch table ---------------------------------------------------------------


class Channel:
    """Records what the kernel sends, as the host would read it (encoded, framed)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def put(self, message: Any) -> None:
        self.sent.extend(FrameReader().feed(encode(message)))


@pytest.fixture
def bare() -> kernel.Kernel:
    """A Kernel without its start-up (which takes over descriptors 1 and 2 and sys.stdout)."""
    k = kernel.Kernel.__new__(kernel.Kernel)
    k.channel = Channel()  # type: ignore[assignment]
    return k


def sent(k: kernel.Kernel) -> list[dict[str, Any]]:
    channel: Channel = k.channel  # type: ignore[assignment]
    return channel.sent


def test_every_request_has_a_handler() -> None:
    # shutdown is the serve loop's own: it ends the kernel before anything is dispatched
    assert set(kernel.HANDLERS) == set(messages.REQUESTS) - {"shutdown"}
    assert set(files.OPS) <= set(kernel.HANDLERS)
    assert all(kernel.HANDLERS[op] == kernel.Kernel.file_op for op in files.OPS)


@pytest.mark.parametrize("op", ["bogus", None, "shutdown", 7])
def test_an_unknown_op_is_answered_failed(bare: kernel.Kernel, op: object) -> None:
    request: dict[str, Any] = {"id": "r1"} if op is None else {"op": op, "id": "r1"}
    bare.dispatch(request)
    assert sent(bare) == [
        {"ev": "failed", "id": "r1", "error": "ProtocolError", "message": f"unknown op {op!r}"}
    ]


def test_an_interrupted_request_is_answered_failed(
    bare: kernel.Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(self: kernel.Kernel, request: dict[str, Any]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(kernel.HANDLERS, "prefault", interrupted)
    bare.dispatch({"op": "prefault", "id": "r2"})
    assert sent(bare) == [
        {"ev": "failed", "id": "r2", "error": "KeyboardInterrupt", "message": "interrupted"}
    ]


def test_setenv_is_done(bare: kernel.Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODECAGE_TEST_SETENV", raising=False)
    bare.dispatch({"op": "setenv", "id": "r3", "envs": {"CODECAGE_TEST_SETENV": 1}})
    assert sent(bare) == [{"ev": "done", "id": "r3"}]
    import os

    assert os.environ["CODECAGE_TEST_SETENV"] == "1"
    monkeypatch.delenv("CODECAGE_TEST_SETENV")


def test_file_ops_reply_as_typed(bare: kernel.Kernel, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.txt"
    requests: list[dict[str, Any]] = [
        {"op": "write", "args": {"path": str(target), "data": "aGk=", "append": False}},
        {"op": "read", "args": {"path": str(target), "offset": 0, "length": 10}},
        {"op": "list", "args": {"path": str(target.parent)}},
        {"op": "stat", "args": {"path": str(target)}},
        {"op": "mkdir", "args": {"path": str(tmp_path / "c")}},
        {"op": "remove", "args": {"path": str(target)}},
        {"op": "stat", "args": {"path": str(target)}},
    ]
    for number, request in enumerate(requests):
        bare.dispatch({**request, "id": number})
    replies = sent(bare)
    assert [r["ev"] for r in replies] == ["done"] * len(requests)
    for request, reply in zip(requests, replies, strict=True):
        reply_type = messages.REPLIES[request["op"]]
        assert set(reply) - {"ev", "id"} <= set(typing.get_type_hints(reply_type))
        assert set(reply) >= {"ev", "id"} | reply_type.__required_keys__
    assert json.loads(json.dumps(replies[2]["entries"]))[0]["name"] == "b.txt"
    assert replies[-1]["exists"] is False


def test_a_failed_file_op(bare: kernel.Kernel, tmp_path: Path) -> None:
    bare.dispatch({"op": "read", "id": "r4", "args": {"path": str(tmp_path / "nothing")}})
    (reply,) = sent(bare)
    assert reply["ev"] == "failed" and reply["error"] == "FileNotFoundError"
    assert reply["errno"] == errno.ENOENT and reply["id"] == "r4"
    assert set(reply) == set(typing.get_type_hints(messages.FailedEvent))


def test_template_requests_match_the_document() -> None:
    from codecage._inside import zygote

    text = " ".join(section("## Template channel (host <-> template)").split())
    ops, carries = text.split("A request carries", 1)
    assert {n for n in names(top_level(ops)) if n.islower()} == set(messages.TEMPLATE)
    documented = set(names(carries.split(";")[0]))
    for cls in messages.TEMPLATE.values():
        assert documented == set(typing.get_type_hints(cls)) == zygote.FIELDS


def test_the_host_builds_typed_requests(fake: Any) -> None:
    from codecage import Policy, Sandbox
    from codecage._jail.host import import_guard

    assert import_guard(Policy()) is None
    guard = import_guard(Policy(modules_deny=["socket"]))
    assert guard == {"op": "guard", "modules_allow": None, "modules_deny": ["socket"]}
    assert set(guard) == set(typing.get_type_hints(messages.GuardRequest)) - {"id"}
    with Sandbox.create(policy=Policy(modules_deny=["socket"])) as sbx:
        sbx.run_code("1")
        sbx.commands.run("true")
    assert [r["op"] for r in fake.requests] == ["guard", "execute", "command"]
    for request in fake.requests:
        cls = messages.REQUESTS[request["op"]]
        assert set(request) == set(typing.get_type_hints(cls)), request["op"]
