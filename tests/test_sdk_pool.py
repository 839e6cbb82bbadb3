"""The public warm pool: `codecage.start_pool(size, policy)` makes the SDK's creates of that
policy (Sandbox, AsyncSandbox, codecage.run) pooled in this process. Correctness only: the
sandbox came from the pool (its hit counter), it is as fresh as a cold one, the pool refills,
and stopping it leaves nothing behind. No timings."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

import codecage
from codecage import AsyncSandbox, Policy, Sandbox
from codecage._jail import BACKENDS, Backend, WithoutPools, _jails, get_jail, started_jail
from codecage._jail.host import HostJail
from codecage._jail.sandbox import HostSandbox

from .conftest import sandbox_cgroups, sandbox_processes

root = pytest.mark.requires_root

# Everything a sandbox could leave for the next one: variables, files, environment.
LEAVE = (
    "import os\n"
    "left_behind = 'a variable'\n"
    "open('/home/user/left.txt', 'w').write('a file')\n"
    "open('/tmp/left.txt', 'w').write('a tmp file')\n"
    "os.environ['LEFT_BEHIND'] = 'an environment variable'\n"
    "os.putenv('LEFT_PUTENV', 'another')\n"
)
LOOK = (
    "import os, json\n"
    "print(json.dumps({'variable': 'left_behind' in globals(),"
    " 'home': sorted(os.listdir('/home/user')), 'tmp': 'left.txt' in os.listdir('/tmp'),"
    " 'env': {k: v for k, v in os.environ.items() if k.startswith(('LEFT', 'MINE'))}}))"
)


def look(sbx: Sandbox) -> dict[str, object]:
    ex = sbx.run_code(LOOK)
    assert ex.error is None, ex
    return json.loads(ex.logs.stdout[-1])  # type: ignore[no-any-return]


@pytest.fixture
def pool() -> Iterator[codecage.Pool]:
    with codecage.start_pool(1, refill_per_s=20) as p:
        assert p.wait_ready()
        yield p
    assert p.stopped


@root
def test_a_pooled_sandbox_is_served_from_the_pool_and_starts_fresh(pool: codecage.Pool) -> None:
    hits = pool.hits
    with Sandbox(envs={"MINE": "first"}) as first:
        assert pool.hits == hits + 1  # from the pool, not cold
        ex = first.run_code(LEAVE + LOOK)
        assert ex.error is None, ex
        assert json.loads(ex.logs.stdout[-1]) == {
            "variable": True,
            "home": ["left.txt"],
            "tmp": True,
            "env": {"LEFT_BEHIND": "an environment variable", "MINE": "first"},
        }  # the control: the probe sees what was left
        assert pool.wait_ready()  # the refill is forked while `first` holds its state
        with Sandbox() as second:
            assert pool.hits == hits + 2
            assert second.id != first.id
            assert look(second) == {"variable": False, "home": [], "tmp": False, "env": {}}
            assert second.run_code("1 + 1").execution_count == 2  # the prefault did not count


@root
def test_the_pool_refills_after_it_is_emptied() -> None:
    with codecage.start_pool(2, refill_per_s=20) as pool:
        assert pool.wait_ready()
        hits, misses = pool.hits, pool.misses
        taken = [Sandbox() for _ in range(3)]  # one more than it holds: that one is cold
        try:
            assert pool.hits == hits + 2 and pool.misses == misses + 1
            assert [s.run_code("6 * 7").text for s in taken] == ["42"] * 3
        finally:
            for s in taken:
                s.kill()
        assert pool.wait_ready() and pool.ready == 2
        with Sandbox() as again:
            assert pool.hits == hits + 3 and again.run_code("2").text == "2"


@root
def test_codecage_run_and_async_sandbox_take_from_the_pool(pool: codecage.Pool) -> None:
    hits = pool.hits
    ex = codecage.run("import os; print(os.environ.get('MINE'))", envs={"MINE": "one-shot"})
    assert ex.exit_code == 0 and ex.logs.stdout == ["one-shot\n"], ex
    assert pool.hits == hits + 1

    async def main() -> str | None:
        assert pool.wait_ready()
        async with await AsyncSandbox.create(envs={"MINE": "async"}) as sbx:
            assert pool.hits == hits + 2
            return (await sbx.run_code("import os; os.environ['MINE']")).text

    assert asyncio.run(main()) == "'async'"


@root
def test_other_policies_start_cold_and_may_have_their_own_pool(pool: codecage.Pool) -> None:
    other = Policy(memory_mb=300)
    hits, misses = pool.hits, pool.misses
    with Sandbox(other) as sbx:
        assert sbx.run_code("1").text == "1"
    assert (pool.hits, pool.misses) == (hits, misses)  # not this pool's shape
    with codecage.start_pool(1, other) as second:
        assert second.wait_ready()
        with Sandbox(other) as a, Sandbox() as b:
            assert second.hits == 1 and pool.hits == hits + 1
            assert a._jailed.policy == other and b._jailed.policy == Policy()


@root
def test_stop_kills_what_waits_and_later_creates_are_cold() -> None:
    processes_before = {p.split(":")[0] for p in sandbox_processes()}
    pool = codecage.start_pool(2, refill_per_s=20)
    assert pool.wait_ready()
    kept = Sandbox()  # handed out before the stop: it is the caller's, and lives on
    try:
        assert pool.hits == 1
        codecage.stop_pool()
        assert pool.stopped and pool.ready == 0 and not pool._thread.is_alive()
        jail = get_jail("namespace")
        assert isinstance(jail, HostJail) and pool not in jail.pools
        assert kept.run_code("40 + 2").text == "42"
        with Sandbox() as cold:
            assert cold.run_code("1").text == "1"
        assert (pool.hits, pool.misses) == (1, 0)  # the stopped pool served nothing more
    finally:
        kept.kill()
    new = [p for p in sandbox_processes() if p.split(":")[0] not in processes_before]
    assert new == [] and sandbox_cgroups() == []  # the waiting sandboxes are gone too
    pool.stop()  # idempotent
    codecage.stop_pool()  # no pool: nothing to do
    with codecage.start_pool(1) as again:  # the policy can be pooled again
        assert again.wait_ready()


@root
def test_bad_requests_are_refused_clearly() -> None:
    for size in (0, -1, True, 1.5, "2"):
        with pytest.raises(codecage.PolicyError, match="size must be an integer of at least 1"):
            codecage.start_pool(size)  # type: ignore[arg-type]
    with codecage.start_pool(1) as pool:
        with pytest.raises(codecage.SandboxError, match="already running"):
            codecage.start_pool(3)  # one pool per policy: the first is untouched
        assert not pool.stopped and pool.size == 1


class _ColdOnly(WithoutPools):
    """A backend that is not a HostJail: it has no warm pool."""

    name = "cold-only"
    enforces = frozenset[str]()

    def check(self, policy: Policy) -> None:
        pass

    def create(self, policy: Policy, envs: dict[str, str] | None = None) -> None:
        raise AssertionError("never called")

    def close(self) -> None:
        pass


def test_a_backend_without_a_pool_says_so() -> None:
    register = Backend("cold-only", "test", _ColdOnly, lambda: None)  # type: ignore[arg-type]
    BACKENDS["cold-only"] = register
    policy = Policy().model_copy(update={"isolation": "cold-only"})  # not a public backend
    try:
        with pytest.raises(codecage.BackendUnavailable, match="'cold-only' has no warm pool"):
            codecage.start_pool(1, policy)
        codecage.stop_pool(policy)  # nothing to stop: no error
    finally:
        del BACKENDS["cold-only"]
        _jails.pop("cold-only", None)
    assert started_jail("cold-only") is None


@root
def test_a_template_renewal_replaces_what_waits_in_every_pool() -> None:
    """One pool renews the template (it is older than that pool's max age): the sandboxes
    waiting in the other pools were forked from the old one, and are replaced too."""
    jail = get_jail("namespace")
    first = jail.template  # type: ignore[attr-defined]
    other = Policy(memory_mb=300)
    with codecage.start_pool(2, other) as waiting:
        assert waiting.wait_ready()
        assert all(s.launcher.template is first for s in waiting._ready)  # type: ignore[attr-defined]
        with codecage.start_pool(1, template_max_age_s=0.5) as renewing:
            assert renewing.wait_ready()
            deadline = time.monotonic() + 60
            while jail.template is first and time.monotonic() < deadline:  # type: ignore[attr-defined]
                time.sleep(0.05)
            assert jail.template is not first  # type: ignore[attr-defined]
        assert waiting.wait_ready()
        with Sandbox(other) as sbx:
            assert waiting.hits == 1
            assert sbx._jailed.launcher.template is not first  # type: ignore[attr-defined]
            assert sbx.run_code("1 + 1").text == "2"
    first.process.wait(timeout=30)  # nothing forked from it is left: it stopped


@root
def test_a_fork_whose_first_cell_fails_is_not_left_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's first cell (prefault) meets a sandbox that died: the pool counts the
    failure and kills what it started (processes, cgroups, workspace), then tries again."""
    real = HostSandbox.prefault

    def dies_first(self: HostSandbox) -> None:
        self.launcher.tree.kill()  # every process of the fresh sandbox, init included
        real(self)

    monkeypatch.setattr(HostSandbox, "prefault", dies_first)
    processes_before = {p.split(":")[0] for p in sandbox_processes()}
    with codecage.start_pool(1) as pool:
        deadline = time.monotonic() + 60
        while pool.failures < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.failures >= 2 and pool.ready == 0
    monkeypatch.undo()
    new = [p for p in sandbox_processes() if p.split(":")[0] not in processes_before]
    assert new == [] and sandbox_cgroups() == []
