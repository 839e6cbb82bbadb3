"""The warm pool: correctness, not speed. A pooled sandbox is indistinguishable from a fresh
one; an empty pool falls back to a cold start; a sandbox that dies in the pool is replaced;
stopping the pool leaves nothing behind."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from codecage import Policy, Sandbox
from codecage._jail import get_jail
from codecage._jail.namespace import NamespaceJail
from codecage._jail.pool import Pool

pytestmark = pytest.mark.requires_root

PROBE = (
    "import os, json, random, numpy\n"
    "print(json.dumps({'uid': os.getuid(), 'files': sorted(os.listdir('/home/user')),"
    " 'tmp': sorted(os.listdir('/tmp')), 'rng': [random.random(), float(numpy.random.rand())],"
    " 'cgroup': open('/proc/self/cgroup').read(), 'env': os.environ.get('MINE'),"
    " 'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit())}))"
)


def jail() -> NamespaceJail:
    j = get_jail("namespace")
    assert isinstance(j, NamespaceJail)
    return j


def wait_ready(pool: Pool, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while pool.ready < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.ready >= n


@pytest.fixture
def pool() -> Iterator[Pool]:
    p = jail().start_pool(3, Policy(), refill_per_s=2)  # slow refills: exhaustion is observable
    try:
        yield p
    finally:
        p.stop()


def probe(sbx: Sandbox) -> dict[str, object]:
    ex = sbx.run_code(PROBE)
    assert ex.error is None and ex.execution_count == 1, ex  # the prefault cell did not count
    return json.loads(ex.logs.stdout[-1])  # type: ignore[no-any-return]


def test_a_pooled_sandbox_is_indistinguishable_from_a_fresh_one(pool: Pool) -> None:
    wait_ready(pool, 3)
    hits = pool.hits
    with Sandbox(envs={"MINE": "pooled"}) as a, Sandbox() as b:
        assert pool.hits == hits + 2
        pa, pb = probe(a), probe(b)
    pool.stop()
    with Sandbox(envs={"MINE": "fresh"}) as c:  # no pool now: a cold start
        pc = probe(c)
    assert pa["files"] == pb["files"] == pc["files"] == []
    assert pa["tmp"] == pc["tmp"]
    assert pa["pids"] == pc["pids"]
    assert pa["env"] == "pooled" and pb["env"] is None and pc["env"] == "fresh"
    assert len({pa["uid"], pb["uid"], pc["uid"]}) == 3  # each its own uid
    assert pa["rng"] != pb["rng"] and pa["rng"][1] != pb["rng"][1]  # type: ignore[index]
    assert a.id != b.id and a._jailed.launcher.tree.dirs != b._jailed.launcher.tree.dirs


def test_other_policies_and_an_empty_pool_start_cold(pool: Pool) -> None:
    wait_ready(pool, 3)
    misses = pool.misses
    with Sandbox(Policy(memory_mb=300)) as other:  # another shape: never from the pool
        assert other.run_code("1 + 1").text == "2"
    assert pool.misses == misses  # not even counted: the pool does not serve that shape
    sandboxes = [Sandbox() for _ in range(5)]  # more than the pool holds
    try:
        assert pool.misses >= misses + 2
        assert [s.run_code("2 * 3").text for s in sandboxes] == ["6"] * 5
    finally:
        for s in sandboxes:
            s.kill()


def test_a_sandbox_that_dies_in_the_pool_is_replaced(pool: Pool) -> None:
    wait_ready(pool, 3)
    victim = pool._ready[0]
    victim.launcher.tree.kill()  # dies while waiting
    deadline = time.monotonic() + 30
    while (pool.replaced == 0 or pool.ready < 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.replaced >= 1 and pool.ready == 3
    with Sandbox() as sbx:
        assert sbx.run_code("1 + 1").text == "2"


def test_the_template_is_renewed_and_the_old_one_ends_with_its_sandboxes() -> None:
    j = jail()
    first = j.template
    keep = Sandbox()  # forked from the first template
    p = j.start_pool(1, Policy(), template_max_age_s=0.5)
    try:
        deadline = time.monotonic() + 60  # a new template's start: seconds, more under load
        while j.template is first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert j.template is not first and first.retired
        assert first.process.poll() is None  # still serving `keep`
        assert keep.run_code("40 + 2").text == "42"
        with Sandbox() as fresh:
            assert fresh._jailed.launcher.template is not first and fresh.run_code("1").text == "1"
    finally:
        p.stop()
        keep.kill()
    first.process.wait(timeout=20)  # its last sandbox ended: it stopped


def test_all_sandboxes_sit_under_one_capped_parent() -> None:
    from codecage._jail import cgroups

    with Sandbox() as sbx:
        memory_dir = sbx._jailed.launcher.tree.dirs["memory"]
        parent = memory_dir.parent
        assert parent.name == jail().owner and parent.name.startswith(cgroups.owner_name() + "-")
        cap = int((parent / "memory.limit_in_bytes").read_text())
        assert cap == jail().total_memory_mb << 20
        assert cap == cgroups.default_total_mb() << 20  # 80% of the host's memory by default
