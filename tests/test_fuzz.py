"""Schemathesis fuzzes the running service from its checked-in OpenAPI document: no input
may produce a server error (5xx).

It has a service of its own, with the default quotas: its coverage phase sends a batch of
MAX_BATCH (10,000) one-shot runs, which the shared service of the other tests (quotas raised
for them) carries out whole, two minutes and more of runs under CI's load; with the default
runs_per_minute, the runs past the quota are refused at once (429 per run)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Service, start_service, stop_service

pytestmark = [pytest.mark.requires_root, pytest.mark.slow]
DOC = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"


@pytest.fixture
def fuzzed(tmp_path: Path) -> Iterator[Service]:
    svc = start_service(tmp_path / "audit.db", ("fuzz",))
    try:
        yield svc
    finally:
        stop_service(svc)


def test_no_input_makes_the_service_fail(fuzzed: Service, tmp_path: Path) -> None:
    service = fuzzed
    schemathesis = Path(sys.executable).parent / "schemathesis"
    # A request the service never answers fails the run by name (--request-timeout), well
    # before this test's own bound; past that bound, what it printed so far is the failure.
    try:
        proc = subprocess.run(
            [
                str(schemathesis), "run", str(DOC),
                "--url", service.url,
                "--header", f"Authorization: Bearer {service.keys['fuzz']}",
                "--checks", "not_a_server_error",
                "--max-examples", "5",
                "--seed", "1",
                "--max-time", "30",
                "--request-timeout", "60",
                "--report-dir", str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout
        pytest.fail(f"schemathesis did not end within 240 s: {(out or '')[-3000:]}")
    summary = proc.stdout[-3000:]
    assert proc.returncode == 0, summary
    assert "Server error" not in proc.stdout and "generated" in proc.stdout, summary
    # within its time, every operation of the document was reached (thousands of cases)
    selected = re.search(r"Selected: (\d+)/(\d+)", proc.stdout)
    tested = re.search(r"Tested: (\d+)", proc.stdout)
    assert selected and tested and selected[1] == selected[2] == tested[1], summary
