"""The kernel's E2B-shaped file requests (docs/protocol.md: entry, walk, rename, watch,
watch_events, unwatch, set_metadata), run by a bare kernel on a temporary directory of
this host: replies as typed, errors as `failed`, and the watchers' bounds."""

from __future__ import annotations

import errno
import os
import stat
import typing
from pathlib import Path
from typing import Any

import pytest

from codecage._inside import kernel, messages, watch


class Channel:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def put(self, message: Any) -> None:
        self.sent.append(dict(message))


@pytest.fixture
def k() -> kernel.Kernel:
    bare = kernel.Kernel.__new__(kernel.Kernel)
    bare.channel = Channel()  # type: ignore[assignment]
    return bare


def ask(k: kernel.Kernel, op: str, **args: Any) -> dict[str, Any]:
    channel: Channel = k.channel  # type: ignore[assignment]
    k.dispatch({"op": op, "id": op, "args": args})
    reply = channel.sent.pop()
    if reply["ev"] == "done":
        hints = typing.get_type_hints(messages.REPLIES[op])
        assert set(reply) - {"ev", "id"} <= set(hints), op
    return reply


def test_entry_walk_and_rename(k: kernel.Kernel, tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "deep.txt").write_text("x")
    (tmp_path / "d" / "top.txt").write_text("hello")
    os.symlink("top.txt", tmp_path / "d" / "link")
    entry = ask(k, "entry", path=str(tmp_path / "d" / "top.txt"))["entry"]
    assert set(entry) == set(typing.get_type_hints(messages.EntryInfo))
    assert (entry["type"], entry["size"], entry["is_symlink"]) == ("file", 5, False)
    assert entry["mode"] == stat.S_IMODE(os.stat(tmp_path / "d" / "top.txt").st_mode)
    assert entry["permissions"].startswith("-rw")
    link = ask(k, "entry", path=str(tmp_path / "d" / "link"))["entry"]
    assert link["type"] == "file" and link["is_symlink"] is True
    assert link["symlink_target"] == str(tmp_path / "d" / "top.txt")

    one = ask(k, "walk", path=str(tmp_path / "d"), depth=1)
    assert [e["name"] for e in one["entries"]] == ["e", "link", "top.txt"]
    two = ask(k, "walk", path=str(tmp_path / "d"), depth=2)
    assert [e["name"] for e in two["entries"]] == ["e", "deep.txt", "link", "top.txt"]
    assert two["truncated"] is False
    missing = ask(k, "walk", path=str(tmp_path / "nope"), depth=1)
    assert missing["ev"] == "failed" and missing["error"] == "FileNotFoundError"
    a_file = ask(k, "walk", path=str(tmp_path / "d" / "top.txt"), depth=1)
    assert a_file["ev"] == "failed" and a_file["error"] == "NotADirectoryError"

    moved = ask(
        k,
        "rename",
        source=str(tmp_path / "d" / "top.txt"),
        destination=str(tmp_path / "n" / "t.txt"),
    )
    assert moved["entry"]["path"] == str(tmp_path / "n" / "t.txt")
    assert not (tmp_path / "d" / "top.txt").exists()
    gone = ask(k, "rename", source=str(tmp_path / "nope"), destination=str(tmp_path / "x"))
    assert gone["ev"] == "failed" and gone["errno"] == errno.ENOENT
    assert not (tmp_path / "x").exists()


def test_metadata_is_user_e2b_attributes(k: kernel.Kernel, tmp_path: Path) -> None:
    target = tmp_path / "m.txt"
    target.write_text("x")
    try:
        os.setxattr(target, "user.probe", b"1")
    except OSError:
        pytest.skip("this filesystem keeps no user attributes")
    os.removexattr(target, "user.probe")
    set_ = ask(k, "set_metadata", path=str(target), metadata={"author": "me", "n": "1"})
    assert set_["entry"]["metadata"] == {"author": "me", "n": "1"}
    os.setxattr(target, "user.other", b"kept")  # not E2B's namespace: neither shown nor removed
    again = ask(k, "set_metadata", path=str(target), metadata={"n": "2"})
    assert again["entry"]["metadata"] == {"n": "2"}
    cleared = ask(k, "set_metadata", path=str(target), metadata={})
    assert cleared["entry"]["metadata"] == {}
    assert os.getxattr(target, "user.other") == b"kept"
    bad = ask(k, "set_metadata", path=str(target), metadata=["not", "a", "map"])
    assert bad["ev"] == "failed" and bad["error"] == "ValueError"


def test_watchers_report_and_are_bounded(k: kernel.Kernel, tmp_path: Path) -> None:
    root = tmp_path / "w"
    root.mkdir()
    started = ask(k, "watch", path=str(root), recursive=True)
    watcher = started["watcher"]
    try:
        (root / "f.txt").write_text("1")
        (root / "sub" / "inner").mkdir(parents=True)  # made before its watch exists
        (root / "sub" / "inner" / "g.txt").write_text("2")
        events = ask(k, "watch_events", watcher=watcher)
        seen = {(e["name"], e["type"]) for e in events["events"]}
        assert {("f.txt", "create"), ("f.txt", "write"), ("sub", "create")} <= seen
        assert ("sub/inner", "create") in seen and ("sub/inner/g.txt", "create") in seen
        assert ask(k, "watch_events", watcher=watcher)["events"] == []
        (root / "sub" / "inner" / "h.txt").write_text("3")  # watched now
        later = {(e["name"], e["type"]) for e in ask(k, "watch_events", watcher=watcher)["events"]}
        assert ("sub/inner/h.txt", "create") in later
    finally:
        assert ask(k, "unwatch", watcher=watcher)["ev"] == "done"
    unknown = ask(k, "watch_events", watcher=watcher)
    assert unknown["ev"] == "failed" and unknown["error"] == "UnknownWatcher"
    assert (
        ask(k, "watch", path=str(tmp_path / "nope"), recursive=False)["error"]
        == "FileNotFoundError"
    )
    (tmp_path / "file").write_text("")
    assert (
        ask(k, "watch", path=str(tmp_path / "file"), recursive=False)["error"]
        == "NotADirectoryError"
    )
    opened = [
        ask(k, "watch", path=str(root), recursive=False)["watcher"] for _ in range(watch.WATCHERS)
    ]
    try:
        over = ask(k, "watch", path=str(root), recursive=False)
        assert over["ev"] == "failed" and over["errno"] == errno.EMFILE
    finally:
        for one in opened:
            ask(k, "unwatch", watcher=one)
    assert not watch._watchers
