"""The error table (codecage._errors.WIRE): every SandboxError has its HTTP status and wire
name, and each one raised in a route comes out of the remote SDK as the same class, with
its message (and CodeRejected's findings), answered at once or in an NDJSON stream."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from codecage import _errors
from codecage._errors import WIRE, CodeRejected, SandboxError, from_wire, wire
from codecage._models import Finding
from codecage._service.manager import Manager
from codecage.testing.fake import FakeJail
from tests.unit.test_service import Service, serve

CLASSES = sorted(
    (
        cls
        for cls in vars(_errors).values()
        if inspect.isclass(cls)
        and issubclass(cls, SandboxError)
        and cls.__module__ == _errors.__name__
    ),
    key=lambda cls: cls.__name__,
)
FINDING = Finding(rule="CC101", severity="high", line=1, col=0, message="imports subprocess")


def instance(cls: type[SandboxError]) -> SandboxError:
    if cls is CodeRejected:
        return CodeRejected("blocked: imports subprocess", [FINDING])
    return cls(f"a {cls.__name__} from the route")


def test_every_sandbox_error_has_an_entry() -> None:
    assert {cls for cls in CLASSES} == set(WIRE), "a SandboxError without a status and name"
    names = [w.name for w in WIRE.values()]
    assert len(names) == len(set(names)), "two classes share a wire name"
    for cls in CLASSES:
        assert wire(instance(cls)) is WIRE[cls]
        assert from_wire(WIRE[cls].name) is cls
        assert 400 <= WIRE[cls].status < 600


def test_a_subclass_without_an_entry_keeps_its_name_and_its_ancestors_status() -> None:
    class Extension(_errors.SandboxNotFound):
        pass

    found = wire(Extension("x"))
    assert (found.status, found.name) == (404, "Extension")
    assert from_wire("Extension") is SandboxError and from_wire("HTTP") is SandboxError


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    from codecage.testing import fake as fakes

    with fakes.installed():
        yield from serve(tmp_path_factory.mktemp("errors"), pool_size=0)


def raising(exc: SandboxError) -> Any:
    def route(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return route


def check(caught: pytest.ExceptionInfo[SandboxError], sent: SandboxError) -> None:
    assert type(caught.value) is type(sent)
    assert str(caught.value) == str(sent)
    if isinstance(sent, CodeRejected):
        assert isinstance(caught.value, CodeRejected) and caught.value.findings == [FINDING]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_each_error_round_trips_through_the_service(
    cls: type[SandboxError],
    service: Service,
    fake: FakeJail,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent = instance(cls)
    with service.client() as client, client.Sandbox() as sbx:
        with monkeypatch.context() as patch:
            patch.setattr(Manager, "create", raising(sent))
            with pytest.raises(SandboxError) as caught:
                client.Sandbox()
            check(caught, sent)
        with monkeypatch.context() as patch:
            patch.setattr(Manager, "_now", raising(sent))  # inside the run's record
            with pytest.raises(SandboxError) as caught:
                sbx.run_code("x")  # one JSON answer: the status and the error body
            check(caught, sent)
            with pytest.raises(SandboxError) as caught:
                sbx.run_code("x", on_stdout=print)  # NDJSON: a `failed` event
            check(caught, sent)


def test_the_http_status_is_the_tables(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    with service.http() as http:
        for cls in CLASSES:
            with monkeypatch.context() as patch:
                patch.setattr(Manager, "create", raising(instance(cls)))
                response = http.post("/v1/sandboxes", json={})
            assert response.status_code == WIRE[cls].status, cls
            assert response.json()["error"]["type"] == WIRE[cls].name


def test_mcp_tool_errors_are_worded_by_the_table(tmp_path: Path) -> None:
    import anyio
    from mcp.server.mcpserver.exceptions import ToolError

    from codecage.mcp_server import _in_thread

    async def main() -> None:
        for cls in CLASSES:
            with pytest.raises(ToolError) as caught:
                await _in_thread(raising(instance(cls)))
            assert str(caught.value) == WIRE[cls].tool_text.format(instance(cls))

    anyio.run(main)
    assert WIRE[_errors.FileNotFoundInSandbox].tool_text.startswith("no such file or directory")
