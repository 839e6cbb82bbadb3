"""The host's end of a full-VM guest's agent (_jail/vm.py: Agent, VmCgroups, GuestMounts):
what the guest answers is hostile input, bounded and type-checked, and a guest that goes
silent or away costs the host a bounded wait, never a wrong verdict. The guest's side here
is a script on a socket pair (the real agent runs in tests/test_vm.py's guests)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from codecage._jail import vm
from codecage._jail.vm import Agent, GuestMounts, VmCgroups

GOOD = {
    "memory_peak": 100 << 20,
    "memory_current": 80 << 20,
    "oom_kills": 1,
    "pids_max_events": 2,
    "cpu_usec": 1_500_000,
}


def _guest(answer: Callable[[dict[str, object]], bytes | None]) -> Iterator[Agent]:
    ours, theirs = socket.socketpair()

    def serve() -> None:
        with contextlib.suppress(OSError), theirs, theirs.makefile("rb") as lines:
            for line in lines:
                reply = answer(json.loads(line))
                if reply is None:
                    return
                theirs.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    agent = Agent(ours)
    yield agent
    agent.close()
    thread.join(5)


@pytest.fixture
def honest() -> Iterator[Agent]:
    yield from _guest(
        lambda req: json.dumps(GOOD if req["op"] == "usage" else {"full": True}).encode() + b"\n"
    )


def _tree(agent: Agent) -> VmCgroups:
    tree = VmCgroups(1, "unit", "unit-owner")
    tree.agent = agent
    return tree


def test_readings_are_the_guest_cgroups(honest: Agent) -> None:
    tree = _tree(honest)
    usage = tree.usage()
    assert (usage.memory_peak_bytes, usage.oom_kills, usage.pids_max_events) == (100 << 20, 1, 2)
    assert usage.cpu_s == 1.5
    assert tree.memory_current() == 80 << 20
    assert GuestMounts(honest).full() is True


@pytest.mark.parametrize(
    "bad",
    [
        {**GOOD, "oom_kills": -1},
        {**GOOD, "oom_kills": True},
        {**GOOD, "memory_peak": "100"},
        {**GOOD, "cpu_usec": 1.5},
        {**GOOD, "pids_max_events": 1 << 64},
        {k: v for k, v in GOOD.items() if k != "oom_kills"},
        ["not", "an", "object"],
        {"error": "boom"},
    ],
)
def test_a_reading_of_the_wrong_shape_is_not_taken(bad: object) -> None:
    replies = iter([json.dumps(GOOD).encode() + b"\n", json.dumps(bad).encode() + b"\n"])
    for agent in _guest(lambda req: next(replies, None)):
        tree = _tree(agent)
        first = tree.usage()  # positive control: a good reading is taken
        assert first.oom_kills == 1
        assert tree.usage() == first  # the bad one is not: the last good one stands


def test_an_answer_too_long_or_not_json_is_refused() -> None:
    for reply in (b"x" * (vm.MAX_REPLY * 4), b"{not json}\n"):
        for agent in _guest(lambda req, reply=reply: reply):
            with pytest.raises(OSError):
                agent.call("usage")


def test_a_silent_or_gone_guest_costs_a_bounded_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm, "AGENT_TIMEOUT_S", 0.2)
    for agent in _guest(lambda req: b""):  # reads, never answers
        with pytest.raises(OSError, match="did not answer"):
            agent.call("usage")
        assert _tree(agent).usage().oom_kills == 0  # no reading yet: nothing claimed
        assert GuestMounts(agent).full() is False
    for agent in _guest(lambda req: None):  # hangs up
        with pytest.raises(OSError):
            agent.call("disks")
