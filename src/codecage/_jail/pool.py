"""The warm pool: sandboxes forked ahead of demand, already in their namespaces and cgroups,
prefaulted by a first (uncounted) cell, handed out once and never reused.

A pool serves one policy shape (its tmpfs sizes and limits are fixed when it is forked); a
request for any other policy, or an empty pool, starts a sandbox cold. A jail keeps at most
one pool per policy. A background thread refills it at a bounded rate, replaces sandboxes
that died while waiting, and re-executes the template once it is older than
`template_max_age_s` (every pool of the jail then replaces its waiting sandboxes).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from .._errors import SandboxError
from .._policy import Policy

if TYPE_CHECKING:
    from .host import HostJail
    from .sandbox import HostSandbox

_renewing = threading.Lock()  # one template renewal at a time, whichever pool notices


class Pool:
    """A running warm pool (made by `codecage.start_pool` or `HostJail.start_pool`, not by
    hand). `stop()` ends it and every sandbox still waiting in it; so does leaving a `with`
    block. `hits` counts creates it served, `misses` creates of its policy that found it
    empty (they started cold), `replaced` sandboxes that died waiting, `failures` forks
    that failed (the pool then pauses a second)."""

    def __init__(
        self,
        jail: HostJail,
        size: int,
        policy: Policy,
        refill_per_s: float,
        template_max_age_s: float,
    ) -> None:
        self.jail, self.size, self.policy = jail, size, policy
        self.refill_interval = 1.0 / refill_per_s if refill_per_s > 0 else 0.0
        self.template_max_age_s = template_max_age_s
        self._ready: deque[HostSandbox] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.hits = self.misses = self.replaced = self.failures = 0
        self._thread = threading.Thread(target=self._fill, name="codecage-pool", daemon=True)
        self._thread.start()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else f"{self.ready}/{self.size} ready"
        return f"<Pool {self.jail.name} {state} hits={self.hits} misses={self.misses}>"

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait until the pool is full (or stopped, or `timeout` seconds passed); whether
        it is full."""
        deadline = time.monotonic() + timeout
        while len(self._ready) < self.size and not self.stopped:
            if time.monotonic() >= deadline:
                return False
            self._stop.wait(0.02)
        return len(self._ready) >= self.size and not self.stopped

    def take(self, policy: Policy) -> HostSandbox | None:
        """A ready sandbox for exactly this policy, or None (the caller starts one cold)."""
        if policy != self.policy or self.stopped:
            return None
        with self._lock:
            while self._ready:
                sandbox = self._ready.popleft()
                if not sandbox.dead():
                    self.hits += 1
                    self._wake.set()
                    return sandbox
                self._discard(sandbox)
            self.misses += 1
        self._wake.set()
        return None

    @property
    def ready(self) -> int:
        return len(self._ready)

    def _discard(self, sandbox: HostSandbox) -> None:
        self.replaced += 1
        self._kill(sandbox)

    def _fill(self) -> None:
        while not self._stop.is_set():
            self._renew()
            self._prune()
            if len(self._ready) >= self.size:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            renewals = self.jail.renewals
            sandbox = None
            try:
                sandbox = self.jail.spawn(self.policy, {})
                sandbox.prefault()
            except (OSError, SandboxError):
                self.failures += 1
                if sandbox is not None:  # started, but its first cell failed: it goes
                    self._kill(sandbox)
                self._stop.wait(1.0)  # a host in trouble: do not spin
                continue
            with self._lock:
                # Not forked from a template that another pool renewed meanwhile.
                current = renewals == self.jail.renewals
                if current:
                    self._ready.append(sandbox)
            if not current:
                self._kill(sandbox)
            elif self.refill_interval:
                self._stop.wait(self.refill_interval)

    def _renew(self) -> None:
        """Re-execute the template once it is too old; then the forks of the old one go from
        every pool of this jail, and fresh ones replace them."""
        with _renewing, contextlib.suppress(OSError, SandboxError):
            if self.jail.renew_if_older(self.template_max_age_s):
                self.jail.renewals += 1
                for pool in self.jail.pools:
                    pool._drain()

    @staticmethod
    def _kill(sandbox: HostSandbox) -> None:
        with contextlib.suppress(OSError, SandboxError):
            sandbox.kill()

    def _prune(self) -> None:
        with self._lock:
            dead = [s for s in self._ready if s.dead()]
            for sandbox in dead:
                self._ready.remove(sandbox)
        for sandbox in dead:
            self._discard(sandbox)

    def _drain(self) -> None:
        with self._lock:
            waiting = list(self._ready)
            self._ready.clear()
        for sandbox in waiting:
            self._kill(sandbox)

    def stop(self) -> None:
        """End the pool: no more creates from it, its thread ends, its waiting sandboxes are
        killed. Sandboxes it already handed out are not affected. Idempotent."""
        self.jail.forget_pool(self)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=60)
        self._drain()
