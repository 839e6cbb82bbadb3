"""Every message of the sandbox protocol, typed: the kernel channel's requests and events,
the supervisor channel's (host <-> init) and the set-up process's. docs/protocol.md
describes them; tests/unit/test_protocol.py keeps that document and these types in step.

These types say what the sender builds and what a well-behaved peer sends. They are no
validation: every frame the host reads comes from the sandbox, and the host checks each
field it uses (codecage/_jail/channel.py, run.py, sandbox.py).
"""

# No `from __future__ import annotations`: TypedDict must see NotRequired (Python 3.11).
from typing import Any, Literal, NotRequired, TypedDict

# -- kernel channel: requests (host -> kernel) ----------------------------------------------
# `id` is added by the host when it sends a request (HostSandbox.request), so a request
# built to be sent later (the session's setenv and guard, resent after every restart)
# carries none yet.


class ExecuteRequest(TypedDict):
    op: Literal["execute"]
    id: str
    code: str
    mode: str  # "session" or "main"
    envs: dict[str, str]
    output_bytes: int
    results_bytes: int


class ReadArgs(TypedDict):
    path: str
    offset: int
    length: int


class WriteArgs(TypedDict):
    path: str
    data: str
    append: bool


class PathArgs(TypedDict):
    path: str


class ReadRequest(TypedDict):
    op: Literal["read"]
    id: NotRequired[str]
    args: ReadArgs


class WriteRequest(TypedDict):
    op: Literal["write"]
    id: NotRequired[str]
    args: WriteArgs


class ListRequest(TypedDict):
    op: Literal["list"]
    id: NotRequired[str]
    args: PathArgs


class StatRequest(TypedDict):
    op: Literal["stat"]
    id: NotRequired[str]
    args: PathArgs


class RemoveRequest(TypedDict):
    op: Literal["remove"]
    id: NotRequired[str]
    args: PathArgs


class MkdirRequest(TypedDict):
    op: Literal["mkdir"]
    id: NotRequired[str]
    args: PathArgs


class CommandRequest(TypedDict):
    op: Literal["command"]
    id: NotRequired[str]
    cmd: str
    timeout_s: float | None
    envs: dict[str, str]
    output_bytes: int


class SetenvRequest(TypedDict):
    op: Literal["setenv"]
    id: NotRequired[str]
    envs: dict[str, str]


class GuardRequest(TypedDict):
    op: Literal["guard"]
    id: NotRequired[str]
    modules_allow: list[str] | None
    modules_deny: list[str]


class PrefaultRequest(TypedDict):
    op: Literal["prefault"]
    id: NotRequired[str]


class ShutdownRequest(TypedDict):
    op: Literal["shutdown"]


Request = (
    ExecuteRequest
    | ReadRequest
    | WriteRequest
    | ListRequest
    | StatRequest
    | RemoveRequest
    | MkdirRequest
    | CommandRequest
    | SetenvRequest
    | GuardRequest
    | PrefaultRequest
    | ShutdownRequest
)
# A request that takes an id and a reply (`done` or `failed`) from HostSandbox.request.
ReplyRequest = (
    ReadRequest
    | WriteRequest
    | ListRequest
    | StatRequest
    | RemoveRequest
    | MkdirRequest
    | CommandRequest
    | SetenvRequest
    | GuardRequest
    | PrefaultRequest
)

# -- kernel channel: what `done` carries, by request ----------------------------------------


EntryType = Literal["file", "dir", "symlink", "other"]


class Entry(TypedDict):
    name: str
    path: str
    type: EntryType
    size: int


class ReadReply(TypedDict):
    data: str
    size: int
    eof: bool


WriteReply = Entry


class ListReply(TypedDict):
    entries: list[Entry]


class StatReply(TypedDict):
    exists: bool
    path: str
    name: NotRequired[str]
    type: NotRequired[EntryType]
    size: NotRequired[int]


class RemoveReply(TypedDict):
    path: str


class MkdirReply(TypedDict):
    path: str
    created: bool


class CommandReply(TypedDict):
    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    truncated: bool


class NoReply(TypedDict):
    pass


# -- kernel channel: events (kernel -> host) ------------------------------------------------


class HelloEvent(TypedDict):
    ev: Literal["hello"]
    protocol: int
    pid: int
    fd: int


class StdoutEvent(TypedDict):
    ev: Literal["stdout"]
    id: Any
    text: str


class StderrEvent(TypedDict):
    ev: Literal["stderr"]
    id: Any
    text: str


class ResultEvent(TypedDict):
    ev: Literal["result"]
    id: Any
    data: dict[str, Any]
    is_main_result: bool


class ErrorEvent(TypedDict):
    ev: Literal["error"]
    id: Any
    name: str
    value: str
    traceback: str


class EndEvent(TypedDict):
    ev: Literal["end"]
    id: Any
    execution_count: int
    exit_code: int | None
    truncated: bool
    duration_ms: float


class DoneEvent(TypedDict):
    """A request's success; the reply's fields (REPLIES, by op) come with it."""

    ev: Literal["done"]
    id: Any


class FailedEvent(TypedDict):
    ev: Literal["failed"]
    id: Any
    error: str
    errno: NotRequired[int | None]
    message: str


Event = (
    HelloEvent
    | StdoutEvent
    | StderrEvent
    | ResultEvent
    | ErrorEvent
    | EndEvent
    | DoneEvent
    | FailedEvent
)

# -- supervisor channel (host <-> init) and set-up ------------------------------------------


class RestartRequest(TypedDict):
    op: Literal["restart"]


class SignalRequest(TypedDict):
    """Where the host cannot signal the sandbox's processes itself (gVisor)."""

    op: Literal["signal"]
    signal: int


class KernelEvent(TypedDict):
    ev: Literal["kernel"]
    generation: int
    token: NotRequired[str | None]


class ExitEvent(TypedDict):
    ev: Literal["exit"]
    generation: int
    signal: int | None
    code: int | None


class SetupErrorEvent(TypedDict):
    ev: Literal["error"]
    message: str


class InitEvent(TypedDict):
    ev: Literal["init"]
    pid: int


# -- template channel (host <-> template) ---------------------------------------------------


class TemplateRequest(TypedDict):
    """Nothing else, ever (zygote.FIELDS): the template's memory is every later fork's."""

    op: Literal["spawn", "reap", "ping"]
    rid: NotRequired[int]  # added by Template._call


# -- the tables ------------------------------------------------------------------------------

REQUESTS: dict[str, type[Any]] = {
    "execute": ExecuteRequest,
    "read": ReadRequest,
    "write": WriteRequest,
    "list": ListRequest,
    "stat": StatRequest,
    "remove": RemoveRequest,
    "mkdir": MkdirRequest,
    "command": CommandRequest,
    "setenv": SetenvRequest,
    "guard": GuardRequest,
    "prefault": PrefaultRequest,
    "shutdown": ShutdownRequest,
}
REPLIES: dict[str, type[Any]] = {
    "read": ReadReply,
    "write": WriteReply,
    "list": ListReply,
    "stat": StatReply,
    "remove": RemoveReply,
    "mkdir": MkdirReply,
    "command": CommandReply,
    "setenv": NoReply,
    "guard": NoReply,
    "prefault": NoReply,
}
EVENTS: dict[str, type[Any]] = {
    "hello": HelloEvent,
    "stdout": StdoutEvent,
    "stderr": StderrEvent,
    "result": ResultEvent,
    "error": ErrorEvent,
    "end": EndEvent,
    "done": DoneEvent,
    "failed": FailedEvent,
}
SUPERVISOR: dict[str, type[Any]] = {  # by "op" (host -> init) or "ev" (init -> host)
    "restart": RestartRequest,
    "signal": SignalRequest,
    "kernel": KernelEvent,
    "exit": ExitEvent,
    "error": SetupErrorEvent,
}
SETUP: dict[str, type[Any]] = {"init": InitEvent, "error": SetupErrorEvent}
TEMPLATE: dict[str, type[Any]] = {op: TemplateRequest for op in ("spawn", "reap", "ping")}
