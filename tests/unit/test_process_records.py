"""ProcessRecords against a scripted process manager: an end record that fails to be
written (the audit log unavailable for a moment) neither stops the records' thread nor
loses the record."""

from __future__ import annotations

import time
from typing import Any

from codecage._errors import AuditUnavailable
from codecage._service import processes
from codecage._service.processes import ProcessRecords

from .test_procs import LiveBox, Peer, Records, manager_script, peer, peers  # noqa: F401


class Flaky(Records):
    """The Manager's side, whose first end record fails as an audit log that did not
    commit in time does."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    def finish(self, run_id: str, kind: str, ex: Any, files: Any = None) -> None:
        if self.failures == 0:
            self.failures += 1
            raise AuditUnavailable("the audit log did not commit in time")
        super().finish(run_id, kind, ex, files)


def test_a_failed_end_record_is_written_next_time(peers: list[Peer], monkeypatch: Any) -> None:  # noqa: F811
    monkeypatch.setattr(processes, "POLL_S", 0.01)
    box = LiveBox(peer(peers, manager_script).manager)
    manager = Flaky()
    records = ProcessRecords(manager)  # type: ignore[arg-type]
    try:
        records.add("ended", box, 6)  # type: ignore[arg-type]
        deadline = time.monotonic() + 20  # a generous bound, never a timed assertion
        while not manager.finished:
            assert time.monotonic() < deadline, "the end was never recorded"
            time.sleep(0.01)
        assert manager.failures == 1 and [r for r, _ in manager.finished] == ["ended"]
        assert records._thread is not None and records._thread.is_alive()
        assert records._watched == {}
    finally:
        records._stop.set()
        if records._thread is not None:
            records._thread.join(5)
