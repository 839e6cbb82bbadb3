"""Attacks on the console in a real browser (headless chromium, one for the module)
against a real `codecage serve` on loopback: hostile code and a hostile approver's name
and reason reach the operator's approvals page through the live list's script (the
DOMParser path, not a page load) and stay text; the console cannot be framed. Each probe
has its positive control. The in-process attacks are tests/unit/test_console_attacks.py."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import codecage
from codecage import ApprovalDenied

from .conftest import Service, cli, start_service, stop_service
from .test_console import HOSTILE_HTML, browser, in_thread, sign_in, wait_for

pytestmark = [pytest.mark.requires_root, pytest.mark.slow]
__all__ = ["browser"]  # the module's browser fixture, shared with tests/test_console.py


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str, str]]:
    where = tmp_path_factory.mktemp("console-attacks")
    config = where / "service.toml"
    config.write_text('pool_size = 0\n[policy]\napproval_findings_at = "high"\n')
    db = where / "audit.db"
    operator = cli("keys", "create", "--tenant", "ops", "--role", "operator", "--db", str(db))
    approver = cli("keys", "create", "--tenant", "alice", "--role", "approver", "--db", str(db))
    svc = start_service(db, ("alice",), config)
    try:
        yield svc, operator, approver
    finally:
        stop_service(svc)


def inert(driver: Any) -> None:
    """No hostile element exists and no script of the sandbox's ran."""
    from selenium.webdriver.common.by import By

    time.sleep(0.5)  # an onerror would have fired by now
    assert driver.find_elements(By.ID, "forged") == []
    assert driver.find_elements(By.CSS_SELECTOR, "main img, main script") == []
    assert "pwned" not in driver.title and driver.title.startswith("codecage console")


def test_hostile_text_through_the_live_list_and_no_framing(
    console: tuple[Service, str, str], browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    svc, operator, approver = console
    driver = browser
    sign_in(driver, svc.url, operator)
    hostile_code = f"import subprocess  # {HOSTILE_HTML}"
    with codecage.connect(svc.url, svc.keys["alice"]) as client, client.Sandbox() as sbx:
        thread, out = in_thread(lambda: sbx.run_code(hostile_code))
        # The request arrives by the live poll (the script parses and adopts the fragment).
        card = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "section.approval"))
        assert HOSTILE_HTML in card.text  # shown, as the text it is (the positive control)
        inert(driver)
        approval = card.get_attribute("data-id")

        # alice's approver signs in with a hostile name and denies with a hostile reason:
        # the operator's page shows both in the decided list, as text.
        with httpx.Client(base_url=svc.url) as other:
            signed = other.post("/console/signin", data={"key": approver, "name": HOSTILE_HTML})
            assert signed.status_code == 303
            page = other.get("/console/approvals").text
            token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
            denied = other.post(
                f"/console/approvals/{approval}",
                data={"csrf": token, "decision": "deny", "reason": HOSTILE_HTML},
            )
            assert denied.status_code == 303
        thread.join(60)
        assert isinstance(out.get("error"), ApprovalDenied), out
        # Decided elsewhere: it leaves the pending list without a reload (it used to stay,
        # its id the same in the list's signature).
        wait_for(lambda: driver.find_elements(By.ID, "none-pending"))
        table = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "table.decided"))
        wait_for(lambda: table.text.count("pwned") >= 2)  # the name and the reason, as text
        inert(driver)

    # Framing: the console refuses to be shown in a frame (frame-ancestors 'none',
    # X-Frame-Options: DENY), even by a page of its own origin: the framing page is the
    # API's /health (no CSP of its own), which frames itself (the positive control).
    driver.get(f"{svc.url}/health")
    script = """
        const done = arguments[arguments.length - 1];
        const frame = document.createElement("iframe");
        frame.src = arguments[0];
        frame.onload = () => {
            let framed = false;
            try { framed = frame.contentDocument !== null && frame.contentDocument.body !== null
                           && frame.contentDocument.location.href.startsWith("http"); }
            catch (e) { framed = false; }
            done(framed);
        };
        document.body.appendChild(frame);
    """
    driver.set_script_timeout(20)
    assert driver.execute_async_script(script, f"{svc.url}/health") is True  # the control
    assert driver.execute_async_script(script, f"{svc.url}/console/approvals") is False
    assert driver.execute_async_script(script, f"{svc.url}/console/nope") is False
