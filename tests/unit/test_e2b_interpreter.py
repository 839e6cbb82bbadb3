"""The code interpreter surface's pure parts: kernel events as E2B's NDJSON lines, and the
kernel's registry of code contexts (no IPython, no bash: a stand-in shell). The real SDK
against a real server is tests/test_e2b_interpreter.py."""

from __future__ import annotations

from typing import Any

import pytest

from codecage._errors import UnsupportedLanguage
from codecage._inside import contexts
from codecage._sandbox import check_language
from codecage._service.e2b.interpreter import event_line, result_line


def test_a_bundle_becomes_e2bs_result_fields() -> None:
    line = result_line(
        {
            "text/plain": "'quoted'",
            "image/png": "iVBOR",
            "application/vnd.codecage.chart+json": {"type": "bar", "title": None, "elements": []},
            "application/vnd.codecage.data+json": {"a": [1]},
            "application/x-other": "kept",
        },
        True,
    )
    assert line == {
        "type": "result",
        "is_main_result": True,
        "text": "quoted",
        "png": "iVBOR",
        "chart": {"type": "bar", "title": None, "elements": []},
        "data": {"a": [1]},
        "extra": {"application/x-other": "kept"},
    }


@pytest.mark.parametrize(
    "bundle",
    [
        {"application/vnd.codecage.chart+json": "not an object", "text/plain": "t"},
        {"application/vnd.codecage.data+json": [1, 2], "text/plain": "t"},
        {"image/png": 7, "text/plain": "t"},
    ],
)
def test_malformed_fields_are_dropped_not_passed_on(bundle: dict[str, Any]) -> None:
    line = result_line(bundle, False)
    assert line == {"type": "result", "is_main_result": False, "text": "t"}


def test_a_bundle_that_is_no_object_is_no_line() -> None:
    assert result_line(["x"], True) is None


def test_events_become_lines_and_the_rest_is_dropped() -> None:
    out = event_line({"ev": "stdout", "text": "hi\n"})
    assert out is not None and out["type"] == "stdout" and out["text"] == "hi\n"
    assert isinstance(out["timestamp"], str)
    assert event_line({"ev": "error", "name": "E", "value": 3, "traceback": None}) == {
        "type": "error",
        "name": "E",
        "value": "3",
        "traceback": "None",
    }
    assert event_line({"ev": "end", "execution_count": 4}) == {
        "type": "number_of_executions",
        "execution_count": 4,
    }
    assert event_line({"ev": "end", "execution_count": "4"}) is None
    assert event_line({"ev": "stdout", "text": 5}) is None
    assert event_line({"ev": "hello"}) is None


@pytest.mark.parametrize("language", [None, "", "python", " Python ", "bash", "BASH"])
def test_supported_languages(language: object) -> None:
    assert check_language(language) in ("python", "bash")


@pytest.mark.parametrize("language", ["js", "r", "java", "typescript", 7])
def test_other_languages_name_the_supported_ones(language: object) -> None:
    with pytest.raises(UnsupportedLanguage, match="supported are python, bash"):
        check_language(language)


class Shell:
    def __init__(self) -> None:
        self.resets = 0
        self.execution_count = 7

    def reset(self, new_session: bool = False) -> None:
        self.resets += 1


def test_the_registry_of_contexts() -> None:
    session = Shell()
    registry = contexts.Contexts(lambda: session, Shell)
    assert list(registry.all) == [contexts.DEFAULT]
    made = registry.create("c1", "python", "/")
    assert made.describe() == {"id": "c1", "language": "python", "cwd": "/"}
    with pytest.raises(ValueError, match="exists already"):
        registry.create("c1", "python", None)
    with pytest.raises(ValueError, match="supported are"):
        registry.create("c2", "ruby", None)
    with pytest.raises(FileNotFoundError):
        registry.create("c3", "python", "/no/such/dir/here")
    with pytest.raises(ValueError, match="context id"):
        registry.create("x" * 65, "python", None)
    with pytest.raises(LookupError):
        registry.select("nope", None)
    assert registry.select("c1", None) is made and registry.take() is made
    assert registry.take().id == contexts.DEFAULT  # a selection is for one cell only
    with pytest.raises(ValueError, match="cannot be removed"):
        registry.remove(contexts.DEFAULT)
    registry.remove("c1")
    with pytest.raises(LookupError):
        registry.get("c1")


def test_a_sandbox_holds_a_bounded_number_of_contexts() -> None:
    registry = contexts.Contexts(Shell, Shell)
    for n in range(contexts.MAX_CONTEXTS - 1):
        registry.create(f"c{n}", "python", "/")
    with pytest.raises(ValueError, match="at most"):
        registry.create("one-more", "python", "/")


# -- the SDK's side of context requests, against scripted (and hostile) kernels --------------

from codecage import (  # noqa: E402
    ApprovalDenied,
    ContextNotFound,
    FileNotFoundInSandbox,
    Policy,
    Sandbox,
    TransportError,
)
from codecage.testing import fake as f  # noqa: E402
from codecage.testing.fake import FakeJail  # noqa: E402


def test_a_cell_in_a_context_selects_it_first(fake: FakeJail) -> None:
    fake.on("context_create", None, f.reply(context_id="c", language="bash", cwd="/tmp"))
    fake.on("context_select", None, f.reply(context_id="c", language="bash", cwd="/tmp"))
    with Sandbox() as sbx:
        ctx = sbx.create_code_context(cwd="/tmp", language="bash")
        sbx.run_code("1")  # the default context: no select
        sbx.run_code("echo", context=ctx)
        sbx.run_code("echo", language="bash")
        ops = fake.ops()
    relevant = [o for o in ops if o in ("context_create", "context_select", "execute")]
    assert relevant == [
        "context_create",
        "execute",
        "context_select",
        "execute",
        "context_select",
        "execute",
    ]
    created = next(r for r in fake.requests if r.get("op") == "context_create")
    assert created["language"] == "bash" and created["cwd"] == "/tmp"
    assert len(created["context_id"]) == 32  # the host's choice, kept for restarts


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (f.failed("LookupError", message="context 'x' not found"), ContextNotFound),
        (f.failed("FileNotFoundError", 2, "no such directory"), FileNotFoundInSandbox),
        (
            f.failed("ValueError", message="unsupported language 'r': supported are"),
            UnsupportedLanguage,
        ),
        (f.reply(context_id=7, language="python", cwd="/"), TransportError),
        (f.reply(context_id="c", language=["python"], cwd="/"), TransportError),
        (f.reply(context_id="c", language="python", cwd="x" * 5000), TransportError),
    ],
)
def test_context_replies_are_checked(fake: FakeJail, reply: f.Frame, error: type) -> None:
    fake.on("context_create", None, reply)
    with Sandbox() as sbx, pytest.raises(error):
        sbx.create_code_context()


@pytest.mark.parametrize(
    "contexts",
    ["not a list", [{"id": "a"}], [{"id": 1, "language": "python", "cwd": "/"}], [7] * 3],
)
def test_a_malformed_context_list_is_a_transport_error(fake: FakeJail, contexts: object) -> None:
    fake.on("context_list", None, f.reply(contexts=contexts))
    with Sandbox() as sbx, pytest.raises(TransportError):
        sbx.list_code_contexts()


def test_too_many_contexts_in_a_list_is_refused(fake: FakeJail) -> None:
    item = {"id": "a", "language": "python", "cwd": "/"}
    fake.on("context_list", None, f.reply(contexts=[item] * (contexts.MAX_CONTEXTS + 1)))
    with Sandbox() as sbx, pytest.raises(TransportError):
        sbx.list_code_contexts()


def test_a_bash_cell_needs_the_command_approval(fake: FakeJail) -> None:
    asked: list[str] = []

    def no(request: Any) -> bool:
        asked.append(request.kind)
        return False

    with Sandbox(Policy(approval_commands=True), approver=no) as sbx:
        assert sbx.run_code("1").error is None  # python: no command approval
        with pytest.raises(ApprovalDenied):
            sbx.run_code("rm -rf /tmp/x", language="bash")
    assert asked == ["command"] and "rm -rf /tmp/x" not in fake.ran()


def test_the_dropped_note_counts_the_lines_of_the_events_it_dropped() -> None:
    """An output event may hold many lines (the kernel batches them): the note where they
    were dropped counts their line ends, not the events; a dropped part of a line is said too."""
    from codecage._service.e2b.interpreter import _Held, dropped_note

    held = _Held(10)
    assert held.take(10, True, 5) == ()  # room: nothing dropped before it
    assert held.take(1, True, 3) is None and held.take(1, True, 4) is None  # no room
    held.give(10)
    gap = held.take(1, True, 1)
    assert gap == (2, 7)
    assert dropped_note(*gap).split()[1] == "7"
    assert held.take(100, True, 0) is None
    held.give(1)
    assert held.take(0) == (1, 0) and "part of a line" in dropped_note(1, 0)
