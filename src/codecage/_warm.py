"""Warm pools for the SDK: `codecage.start_pool` and `codecage.stop_pool`.

A pool keeps sandboxes of one policy started, prefaulted and waiting in this process, so a
`Sandbox(policy)`, `AsyncSandbox.create(policy)` or `codecage.run(code, policy)` of exactly
that policy takes one (~1.5 ms to a first result instead of ~30 ms cold). Each pooled sandbox
is handed out once and never reused; the pool forks a fresh one to replace it.
"""

from __future__ import annotations

from ._jail import get_jail, started_jail
from ._jail.pool import Pool
from ._policy import Policy


def start_pool(
    size: int,
    policy: Policy | None = None,
    *,
    refill_per_s: float = 50.0,
    template_max_age_s: float = 3600.0,
) -> Pool:
    """Keep `size` sandboxes of `policy` (default: `Policy()`) ready in this process, until
    `stop_pool(policy)`, the returned pool's `stop()`, the end of its `with` block, or exit.

    Creates of any other policy start cold, as do creates of this one while the pool is
    empty (it refills at `refill_per_s`). Raises PolicyError for a size below 1 or a policy
    the backend refuses, BackendUnavailable for a backend that has no pool, and
    SandboxError if a pool for this policy is already running (one pool per policy)."""
    policy = policy or Policy()
    return get_jail(policy.isolation).start_pool(size, policy, refill_per_s, template_max_age_s)


def stop_pool(policy: Policy | None = None) -> None:
    """Stop the pool of `policy` (default: `Policy()`) and kill the sandboxes waiting in it;
    nothing to do if there is none. Sandboxes it already handed out live on."""
    policy = policy or Policy()
    jail = started_jail(policy.isolation)
    pool = jail.pool_for(policy) if jail is not None else None
    if pool is not None:
        pool.stop()
