"""AsyncSandbox: the Sandbox API as coroutines, derived from the synchronous one.

Each call runs the synchronous method in a worker thread; callbacks may be plain
functions or coroutine functions (the latter are run on the caller's event loop).
Nothing here re-implements behaviour, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from typing import Any

from ._approvals import Approver
from ._models import Execution
from ._policy import Policy
from ._processes import CommandHandle
from ._sandbox import Sandbox, WatchHandle
from ._volumes import Volumes

_CALLBACKS = ("on_stdout", "on_stderr", "on_result", "on_error", "on_pty")


def _bridge_callback(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        result = fn(*args)
        if inspect.isawaitable(result):
            return asyncio.run_coroutine_threadsafe(_await(result), loop).result()
        return result

    return call


async def _await(awaitable: Any) -> Any:
    return await awaitable


async def _in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    loop = asyncio.get_running_loop()
    for name in _CALLBACKS:
        if kwargs.get(name) is not None:
            kwargs[name] = _bridge_callback(loop, kwargs[name])
    return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))


class _AsyncProxy:
    """Every public method of the wrapped object, as a coroutine."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name.startswith("_") or not callable(value):
            return value

        async def method(*args: Any, **kwargs: Any) -> Any:
            result = await _in_thread(value, *args, **kwargs)
            # a background command's handle and a directory watch are awaited as well
            # (wait, kill, send_stdin; get_new_events, stop)
            handle = isinstance(result, (CommandHandle, WatchHandle))
            return _AsyncProxy(result) if handle else result

        method.__name__ = name
        method.__doc__ = value.__doc__
        return method


class AsyncSandbox(_AsyncProxy):
    """`async with await AsyncSandbox.create() as sbx: (await sbx.run_code("1+1")).text`"""

    _target: Sandbox

    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__(sandbox)
        self.files = _AsyncProxy(sandbox.files)
        self.commands = _AsyncProxy(sandbox.commands)
        self.pty = _AsyncProxy(sandbox.pty)

    @classmethod
    async def create(
        cls,
        policy: Policy | None = None,
        *,
        envs: dict[str, str] | None = None,
        approver: Approver | None = None,
        template: str | None = None,
        volumes: dict[str, str] | None = None,
        volume_store: Volumes | None = None,
    ) -> AsyncSandbox:
        """`approver` is called in a worker thread, never on the event loop; `template` and
        `volumes` as Sandbox's (docs/templates.md, docs/volumes.md)."""
        sandbox = await _in_thread(
            Sandbox,
            policy,
            envs=envs,
            approver=approver,
            template=template,
            volumes=volumes,
            volume_store=volume_store,
        )
        return cls(sandbox)

    @property
    def id(self) -> str:
        return self._target.id

    @property
    def sandbox_id(self) -> str:
        return self._target.id

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await _in_thread(self._target.kill)

    # Declared for type checkers and readers; the proxy supplies the same for every method.
    async def run_code(self, code: str, **kwargs: Any) -> Execution:
        result: Execution = await _in_thread(self._target.run_code, code, **kwargs)
        return result

    async def kill(self) -> None:
        await _in_thread(self._target.kill)

    close = kill
