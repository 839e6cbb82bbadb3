"""The operator's console in a real browser (Debian's chromium, headless, driven by
Selenium through Debian's chromedriver) against a real `codecage serve` on loopback: sign
in, a pending approval appears while a run waits, approve it and the run finishes, deny
another and the SDK raises ApprovalDenied, the run in the audit trail with its chart, a
sandbox killed, a page of hostile output that does nothing. One browser for the module.

With CODECAGE_CONSOLE_SCREENSHOTS=DIR each page's screenshot is written there
(docs/console/ holds the ones docs/console.md shows). The refusals with their positive
controls are tests/unit/test_console.py (fast, in process); a few run here too, on the
real service."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import codecage
from codecage import ApprovalDenied, SandboxNotFound

from .conftest import Service, cli, start_service, stop_service

pytestmark = [pytest.mark.requires_root, pytest.mark.slow]

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SHOTS = os.environ.get("CODECAGE_CONSOLE_SCREENSHOTS")
HOSTILE_HTML = (
    '<script>document.title="pwned"</script>'
    '<form method="post" action="/console/approvals/x"><button id="forged">Approve</button></form>'
    "<img src=x onerror=\"document.title='pwned'\">"
)
HOSTILE = f"print({HOSTILE_HTML!r})"
CHART = (
    "import matplotlib.pyplot as plt\n"
    "plt.figure(figsize=(4, 2.5)); plt.plot([1, 4, 2, 5]); plt.title('sales'); plt.show()"
)


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str]]:
    where = tmp_path_factory.mktemp("console")
    config = where / "service.toml"
    config.write_text(
        'pool_size = 1\n[policy]\napproval_findings_at = "high"\napproval_window_s = 60\n'
    )
    db = where / "audit.db"
    operator = cli("keys", "create", "--tenant", "ops", "--role", "operator", "--db", str(db))
    svc = start_service(db, ("alice", "bob"), config)
    try:
        yield svc, operator
    finally:
        stop_service(svc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or DRIVER is None:
        pytest.skip(
            "no chromium/chromedriver (Debian's chromium, chromium-driver: scripts/install-backends)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=DriverService(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except Exception:  # not there yet (selenium's NoSuchElement, a stale element)
            found = None
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"not in {timeout} s: {check}")


def shot(driver: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SHOTS) / f"{name}.png"))


def sign_in(driver: Any, url: str, key: str, name: str = "Olga") -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/console")
    wait_for(lambda: driver.find_element(By.ID, "key"))
    shot(driver, "signin")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "signin").click()
    wait_for(lambda: "/console/approvals" in driver.current_url)


def in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def go() -> None:
        try:
            out["value"] = work()
        except Exception as exc:
            out["error"] = exc

    thread = threading.Thread(target=go)
    thread.start()
    return thread, out


def test_approvals_audit_trail_kill_and_hostile_output(
    console: tuple[Service, str], browser: Any
) -> None:

    svc, operator = console
    driver = browser
    with svc.client() as client:
        signed_in_flow(driver, svc, operator, client)


def signed_in_flow(driver: Any, svc: Service, operator: str, client: codecage.Client) -> None:
    from selenium.webdriver.common.by import By

    sign_in(driver, svc.url, operator)
    assert driver.find_elements(By.ID, "none-pending")
    cookies = {c["name"]: c for c in driver.get_cookies()}
    assert (
        cookies["codecage_console"]["httpOnly"]
        and cookies["codecage_console"]["sameSite"] == "Strict"
    )
    assert operator not in driver.current_url

    # 1. a run waits; its request appears without a reload; approved, the run finishes
    with client.Sandbox() as sbx:
        thread, out = in_thread(lambda: sbx.run_code("import subprocess\nprint('approved ran')"))
        card = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "section.approval"))
        assert "import subprocess" in card.text and "CC101 high" in card.text
        assert card.find_elements(By.CSS_SELECTOR, ".line.finding")  # the finding's line marked
        assert re.search(r"\d+ s left", card.text)
        shot(driver, "approvals")
        card.find_element(By.CSS_SELECTOR, "input.reason").send_keys("looked at it")
        card.find_element(By.CSS_SELECTOR, "button.approve").click()
        thread.join(60)
        assert out["value"].logs.stdout == ["approved ran\n"], out
        wait_for(lambda: "Approved" in driver.find_element(By.CSS_SELECTOR, ".flash").text)
        assert "Olga (console)" in driver.find_element(By.CSS_SELECTOR, "table.decided").text

        # 2. another, denied with a reason: ApprovalDenied in the SDK
        thread, out = in_thread(lambda: sbx.run_code("import subprocess"))
        card = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "section.approval"))
        card.find_element(By.CSS_SELECTOR, "input.reason").send_keys("not today")
        card.find_element(By.CSS_SELECTOR, "button.deny").click()
        thread.join(60)
        assert isinstance(out.get("error"), ApprovalDenied), out
        assert "Olga (console)" in str(out["error"]) and "not today" in str(out["error"])

        # 3. a chart and hostile output in the audit trail
        charted = sbx.run_code(CHART)
        assert charted.results and charted.results[0].png
        sbx.run_code(HOSTILE)
        driver.get(f"{svc.url}/console/runs?tenant=alice&sandbox={sbx.id}")
        shot(driver, "audit")
        links = driver.find_elements(By.CSS_SELECTOR, "a.run-link")
        assert len(links) >= 4  # the approved, the denied, the chart, the hostile
        runs = {r["code"]: r for r in httpx_runs(svc, sbx.id)}
        chart_run = runs[CHART]["id"]
        driver.get(f"{svc.url}/console/runs/{chart_run}")
        image = wait_for(lambda: driver.find_element(By.CSS_SELECTOR, "img.result-image"))
        wait_for(lambda: driver.execute_script("return arguments[0].naturalWidth", image) > 100)
        shot(driver, "run")

        # 4. the hostile run's page: text, no script ran, no forged button exists
        title = driver.title
        driver.get(f"{svc.url}/console/runs/{runs[HOSTILE]['id']}")
        output = wait_for(lambda: driver.find_element(By.ID, "output"))
        assert output.text.strip() == HOSTILE_HTML  # shown as the text it is
        assert driver.find_elements(By.ID, "forged") == []
        assert driver.find_elements(By.CSS_SELECTOR, "main img") == []
        time.sleep(0.5)  # an onerror would have fired by now
        assert "pwned" not in driver.title and driver.title.startswith("codecage console")
        assert title != "pwned"
        shot(driver, "hostile")

        # 5. the sandbox killed from the console, audited
        driver.get(f"{svc.url}/console/sandboxes")
        row = wait_for(lambda: driver.find_element(By.ID, f"sandbox-{sbx.id}"))
        assert "alice" in driver.find_element(By.TAG_NAME, "main").text
        shot(driver, "sandboxes")
        row.find_element(By.CSS_SELECTOR, "button.kill").click()
        wait_for(lambda: f"Killed {sbx.id}" in driver.find_element(By.CSS_SELECTOR, ".flash").text)
        with pytest.raises(SandboxNotFound):
            sbx.run_code("1")
    kinds = [r["kind"] for r in httpx_runs(svc, sbx.id)]
    assert "sandbox_kill" in kinds

    # 6. the charts draw from the same data as /metrics
    driver.get(f"{svc.url}/console/charts")
    for name in ("runs", "latency", "memory"):
        img = wait_for(lambda name=name: driver.find_element(By.ID, f"chart-{name}"))
        wait_for(lambda img=img: driver.execute_script("return arguments[0].naturalWidth", img) > 0)
    shot(driver, "charts")
    errors = [
        e
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "favicon" not in e["message"]
    ]
    assert errors == [], errors  # no CSP violation, no failed script


def httpx_runs(svc: Service, sandbox_id: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{svc.url}/v1/audit",
        params={"sandbox_id": sandbox_id, "limit": 1000},
        headers={"Authorization": f"Bearer {svc.keys['alice']}"},
    )
    response.raise_for_status()
    return list(response.json())


def test_refusals_on_the_real_service(console: tuple[Service, str]) -> None:
    """A wrong key, a forged CSRF token, another tenant's run: refused, nothing changed;
    each with its positive control."""
    svc, operator = console
    with codecage.connect(svc.url, svc.keys["alice"]) as alice:
        alice.run("print('mine')")
    run_id = httpx_runs_all(svc)[-1]["id"]
    with httpx.Client(base_url=svc.url) as bob, httpx.Client(base_url=svc.url) as ops:
        assert bob.post("/console/signin", data={"key": "wrong"}).status_code == 401
        assert bob.post("/console/signin", data={"key": svc.keys["bob"]}).status_code == 303
        assert bob.get(f"/console/runs/{run_id}").status_code == 404
        assert ops.post("/console/signin", data={"key": operator}).status_code == 303
        assert ops.get(f"/console/runs/{run_id}").status_code == 200
        page = ops.get("/console/sandboxes").text
        token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
        assert ops.post("/console/signout", data={"csrf": "forged"}).status_code == 403
        assert ops.get("/console/sandboxes").status_code == 200  # still signed in
        assert ops.post("/console/signout", data={"csrf": token}).status_code == 303
        assert ops.get("/console/sandboxes").status_code == 303  # signed out


def httpx_runs_all(svc: Service) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{svc.url}/v1/audit", headers={"Authorization": f"Bearer {svc.keys['alice']}"}
    )
    return list(response.json())
