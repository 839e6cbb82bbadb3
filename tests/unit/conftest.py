"""The unit layer: everything above the jail, against the fake backend
(codecage.testing.fake), without root, a runtime or a kernel. Nothing here tests the jail.

Every test gets the fake installed as the default backend ("namespace"); after it, every
sandbox it created must have been killed and every thread of the fake must be gone."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from codecage.testing import fake as fakes


@pytest.fixture(autouse=True)
def fake() -> Iterator[fakes.FakeJail]:
    with fakes.installed() as jail:
        yield jail
        deadline = time.monotonic() + 5
        while (jail.live() or jail.threads()) and time.monotonic() < deadline:
            time.sleep(0.01)
        left = [b.id for b in jail.live()]
        assert not left, f"fake sandboxes left alive by this test: {left}"
        assert not jail.errors, f"the fake's threads failed: {jail.errors}"
    assert not jail.threads(), f"fake threads left running: {jail.threads()}"
