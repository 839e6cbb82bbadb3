"""Nothing of one sandbox stays in the memory every later sandbox is forked from.

Sandbox A gets a secret (in `envs` at creation and in a run's `envs`) and is closed; every
later sandbox (the SDK's, a one-shot run, a pool refill, one after a kernel restart, another
tenant's through the service) scans its own memory (/proc/self/maps and /proc/self/mem, every
readable region) and that of its init, and never finds it. Control: the same scan finds a
secret the probe planted in its own process, so "not found" is never a scan that reads nothing.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import codecage
from codecage import Policy, Sandbox
from codecage._jail import get_jail
from codecage._jail.namespace import NamespaceJail

from .conftest import start_service, stop_service

pytestmark = pytest.mark.requires_root

MARK = "CCLEAK"  # every secret here is MARK + 32 hex digits

# The probe never holds a secret of the test's: it reports every MARK+hex it finds, so the
# needle it scans for is not itself in its memory. It plants its own (the control) first.
SCAN = r"""
import os, re, json
planted = "CCLEAK" + os.urandom(16).hex()
pattern = re.compile(rb"CCLEAK([0-9a-f]{32})")

def scan(pid):
    found, regions = set(), 0
    try:
        maps = open(f"/proc/{pid}/maps").read().splitlines()
        mem = open(f"/proc/{pid}/mem", "rb", buffering=0)
    except OSError as exc:
        return None, repr(exc)
    with mem:
        for line in maps:
            fields = line.split()
            if fields[1][0] != "r" or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            regions += 1
            tail = b""
            while start < end:
                size = min(8 << 20, end - start)
                try:
                    mem.seek(start)
                    chunk = tail + mem.read(size)
                except (OSError, ValueError, OverflowError):
                    break
                found.update(m.group(1).decode() for m in pattern.finditer(chunk))
                tail = chunk[-40:]
                start += size
    return sorted(found), regions

own, regions = scan("self")
init, why = scan(1)
print(json.dumps({"planted": planted[6:], "own": own, "regions": regions,
                  "init": init, "init_regions": why}))
"""


def scanned(stdout: list[str]) -> dict[str, object]:
    report: dict[str, object] = json.loads("".join(stdout).strip().splitlines()[-1])
    return report


def assert_clean(report: dict[str, object], secrets_: list[str], where: str) -> None:
    own = report["own"]
    assert isinstance(own, list) and isinstance(report["regions"], int)
    assert report["planted"] in own, f"{where}: the scan did not find its own planted secret"
    assert report["regions"] > 10, f"{where}: the scan read too little: {report}"
    for secret in secrets_:
        assert secret[len(MARK) :] not in own, f"{where}: found sandbox A's secret in its memory"
        init = report["init"]
        if isinstance(init, list):  # init (PID 1) runs as the sandbox's uid: code may read it
            assert secret[len(MARK) :] not in init, f"{where}: found A's secret in its init"


def secret() -> str:
    return MARK + secrets.token_hex(16)


def tenant_envs(prefix: str = "") -> dict[str, str]:
    """What a tenant's sandbox holds: API keys and a URL with a password, each a secret."""
    envs = {
        "OPENAI_API_KEY": secret(),
        "ANTHROPIC_API_KEY": secret(),
        "DATABASE_URL": f"postgres://app:{secret()}@db.internal/app",
        "S": secret(),
        "CUSTOMER_ID": secret(),
        **{f"TOKEN_{i}": secret() for i in range(40)},  # tenants have many
    }
    return {prefix + k: v for k, v in envs.items()}


def secrets_in(envs: dict[str, str]) -> list[str]:
    return [MARK + v.split(MARK, 1)[1][:32] for v in envs.values()]


CHECK = "import os; print(sum(len(v) for v in os.environ.values() if 'CCLEAK' in v))"


def expected(*envs: dict[str, str]) -> list[str]:
    return [f"{sum(len(v) for e in envs for v in e.values())}\n"]


def sandbox_a() -> list[str]:
    """A sandbox that held secrets in its envs at creation and in a run's, and is closed."""
    envs, run_envs = tenant_envs(), {"RUN_TOKEN": secret()}
    with Sandbox(envs=envs) as a:
        ex = a.run_code(CHECK, envs=run_envs)
        assert ex.error is None and ex.logs.stdout == expected(envs, run_envs), ex
    return secrets_in(envs) + secrets_in(run_envs)


def jail() -> NamespaceJail:
    j = get_jail("namespace")
    assert isinstance(j, NamespaceJail)
    return j


def test_the_sdk_and_one_shot_runs_never_see_an_earlier_sandboxs_secrets() -> None:
    leaked: list[str] = []
    for _ in range(4):  # several rounds: each later fork must be clean, not just the first
        leaked += sandbox_a()
        with Sandbox() as b:
            ex = b.run_code(SCAN)
            assert ex.error is None, ex
            assert_clean(scanned(ex.logs.stdout), leaked, "a later SDK sandbox")
            # A kernel restart forks a new kernel from init: still nothing of A's.
            died = b.run_code("import os; os._exit(3)")
            assert died.state_lost
            ex = b.run_code(SCAN)
            assert ex.error is None, ex
            assert_clean(scanned(ex.logs.stdout), leaked, "after a kernel restart")
        one_shot_envs = tenant_envs()
        first = codecage.run(CHECK, envs=one_shot_envs)  # a one-shot run's envs, too
        assert first.logs.stdout == expected(one_shot_envs), first
        leaked += secrets_in(one_shot_envs)
        one_shot = codecage.run(SCAN)
        assert one_shot.error is None, one_shot
        assert_clean(scanned(one_shot.logs.stdout), leaked, "a one-shot run")


@pytest.fixture
def refilled_pool() -> Iterator[None]:
    try:
        yield
    finally:
        for pool in jail().pools:
            pool.stop()


def wait_ready(n: int) -> None:
    pool = jail().pool_for(Policy())
    assert pool is not None
    deadline = time.monotonic() + 60
    while pool.ready < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.ready >= n


def test_a_pool_refill_never_sees_an_earlier_sandboxs_secrets(refilled_pool: None) -> None:
    leaked = sandbox_a()
    pool = jail().start_pool(2, Policy(), refill_per_s=50)
    wait_ready(2)
    hits = pool.hits
    with Sandbox() as b:
        assert pool.hits == hits + 1  # a sandbox the pool forked after A was closed
        ex = b.run_code(SCAN)
        assert ex.error is None, ex
        assert_clean(scanned(ex.logs.stdout), leaked, "a pooled sandbox")
    envs = tenant_envs()
    with Sandbox(envs=envs) as c:  # taken from the pool: its envs go to it, not the template
        assert c.run_code(CHECK).logs.stdout == expected(envs)
    leaked += secrets_in(envs)
    leaked += sandbox_a()  # and a cold one while the pool refills
    wait_ready(2)
    for _ in range(2):
        with Sandbox() as d:
            ex = d.run_code(SCAN)
            assert_clean(scanned(ex.logs.stdout), leaked, "a pool refill")


@pytest.mark.parametrize("pool_size", [0, 2])  # cold forks; and pooled ones with refills
def test_another_tenant_on_the_service_never_sees_the_secrets(
    tmp_path: Path, pool_size: int
) -> None:
    config = tmp_path / "service.toml"
    config.write_text(f"pool_size = {pool_size}\n")
    svc = start_service(tmp_path / "audit.db", ("alice", "bob"), config)
    try:
        leaked: list[str] = []
        for _ in range(3):
            envs, run_envs, one_shot_envs = tenant_envs(), tenant_envs("RUN_"), tenant_envs()
            with svc.client("alice") as alice:
                a = alice.Sandbox(envs=envs)
                ex = a.run_code(CHECK, envs=run_envs)
                assert ex.logs.stdout == expected(envs, run_envs), ex
                a.kill()
                one = alice.run(CHECK, envs=one_shot_envs)
                assert one.logs.stdout == expected(one_shot_envs), one
            leaked += secrets_in(envs) + secrets_in(run_envs) + secrets_in(one_shot_envs)
            with svc.client("bob") as bob:
                b = bob.Sandbox()
                try:
                    ex = b.run_code(SCAN)
                    assert ex.error is None, ex
                    assert_clean(scanned(ex.logs.stdout), leaked, "bob's sandbox")
                finally:
                    b.kill()
                ex = bob.run(SCAN)
                assert ex.error is None, ex
                assert_clean(scanned(ex.logs.stdout), leaked, "bob's one-shot run")
    finally:
        stop_service(svc)


def test_the_template_refuses_a_request_carrying_anything_of_a_sandbox() -> None:
    template = jail().template
    reply = template._call({"op": "spawn", "spec": {"env": {"K": secret()}}}, 10, fds=1)
    assert reply["ok"] is False and reply["_fds"] == [], reply
    assert "only op and rid" in reply["error"]
    assert template.ping()["ok"]  # and goes on serving
    assert template._call({"op": "reap"}, 10)["ok"]  # what the host sends names nothing
