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


class ContextCreateRequest(TypedDict):
    op: Literal["context_create"]
    id: NotRequired[str]
    context_id: str  # chosen by the host: the same context again after a kernel restart
    language: str  # "python" or "bash"
    cwd: str


class ContextListRequest(TypedDict):
    op: Literal["context_list"]
    id: NotRequired[str]


class ContextSelectRequest(TypedDict):
    """The context the next `execute` runs in (then the default one again)."""

    op: Literal["context_select"]
    id: NotRequired[str]
    context_id: str | None  # None: the language's default context
    language: str


class ContextRestartRequest(TypedDict):
    op: Literal["context_restart"]
    id: NotRequired[str]
    context_id: str


class ContextRemoveRequest(TypedDict):
    op: Literal["context_remove"]
    id: NotRequired[str]
    context_id: str


class PackArgs(TypedDict):
    cursor: str | None  # None: a new pack
    size: NotRequired[int]  # at most this many bytes (and files.CHUNK) per reply
    memory: NotRequired[bool]  # the variables too (default), else files, env and cwd only
    plain: NotRequired[bool]  # a tar of the workspace's files only (a volume's export)


class PackRequest(TypedDict):
    """The next chunk of this sandbox's state for a fork (fork.py)."""

    op: Literal["pack"]
    id: NotRequired[str]
    args: PackArgs


class UnpackArgs(TypedDict):
    data: str  # base64
    last: bool
    plain: NotRequired[bool]  # a tar of files only, no state (a volume's import)


class UnpackRequest(TypedDict):
    """The next chunk of another sandbox's pack, into this one (fork.py)."""

    op: Literal["unpack"]
    id: NotRequired[str]
    args: UnpackArgs


class WalkArgs(TypedDict):
    path: str
    depth: int


class RenameArgs(TypedDict):
    source: str
    destination: str


class WatchArgs(TypedDict):
    path: str
    recursive: bool


class WatcherArgs(TypedDict):
    watcher: str


class EntryRequest(TypedDict):
    op: Literal["entry"]
    id: NotRequired[str]
    args: PathArgs


class WalkRequest(TypedDict):
    op: Literal["walk"]
    id: NotRequired[str]
    args: WalkArgs


class RenameRequest(TypedDict):
    op: Literal["rename"]
    id: NotRequired[str]
    args: RenameArgs


class WatchRequest(TypedDict):
    op: Literal["watch"]
    id: NotRequired[str]
    args: WatchArgs


class WatchEventsRequest(TypedDict):
    op: Literal["watch_events"]
    id: NotRequired[str]
    args: WatcherArgs


class UnwatchRequest(TypedDict):
    op: Literal["unwatch"]
    id: NotRequired[str]
    args: WatcherArgs


class MetadataArgs(TypedDict):
    path: str
    metadata: dict[str, str]


class SetMetadataRequest(TypedDict):
    op: Literal["set_metadata"]
    id: NotRequired[str]
    args: MetadataArgs


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
    | ContextCreateRequest
    | ContextListRequest
    | ContextSelectRequest
    | ContextRestartRequest
    | ContextRemoveRequest
    | EntryRequest
    | WalkRequest
    | RenameRequest
    | WatchRequest
    | WatchEventsRequest
    | UnwatchRequest
    | SetMetadataRequest
    | PackRequest
    | UnpackRequest
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
    | ContextCreateRequest
    | ContextListRequest
    | ContextSelectRequest
    | ContextRestartRequest
    | ContextRemoveRequest
    | EntryRequest
    | WalkRequest
    | RenameRequest
    | WatchRequest
    | WatchEventsRequest
    | UnwatchRequest
    | SetMetadataRequest
    | PackRequest
    | UnpackRequest
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


class PackReply(TypedDict):
    cursor: str
    data: str  # base64
    eof: bool


class UnpackReply(TypedDict):
    names: int  # variables the state held (0 until the last chunk)
    files: int  # workspace entries unpacked (likewise)


class ContextInfo(TypedDict):
    id: str
    language: str
    cwd: str


class ContextReply(TypedDict):
    """`context_id`, not `id`: the reply's `id` is the request's."""

    context_id: str
    language: str
    cwd: str


class ContextListReply(TypedDict):
    contexts: list[ContextInfo]


class EntryInfo(TypedDict):
    """A file's full description (E2B's EntryInfo): `mode` the permission bits,
    `permissions` as `ls -l` shows them, `mtime` in seconds since the epoch; a symlink is
    described by its target (`is_symlink`, `symlink_target` the resolved path)."""

    name: str
    path: str
    type: EntryType
    size: int
    mode: int
    permissions: str
    owner: str
    group: str
    mtime: float
    is_symlink: bool
    symlink_target: str | None
    metadata: dict[str, str]  # E2B's file metadata: the `user.e2b.*` extended attributes


class EntryReply(TypedDict):
    entry: EntryInfo


class WalkReply(TypedDict):
    entries: list[EntryInfo]
    truncated: bool


class WatchReply(TypedDict):
    watcher: str
    path: str


WatchEventType = Literal["create", "write", "remove", "rename", "chmod"]


class WatchEvent(TypedDict):
    name: str  # relative to the watched directory
    type: WatchEventType


class WatchEventsReply(TypedDict):
    events: list[WatchEvent]
    overflow: bool


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


class StartProcmanRequest(TypedDict):
    """Start the process manager (the host has none yet, or lost the last one)."""

    op: Literal["start_procman"]


class SignalRequest(TypedDict):
    """Where the host cannot signal the sandbox's processes itself (gVisor)."""

    op: Literal["signal"]
    signal: int


class KernelEvent(TypedDict):
    ev: Literal["kernel"]
    generation: int
    token: NotRequired[str | None]


class ProcmanEvent(TypedDict):
    """The process manager's channel (one descriptor, or on the OCI backends a token)."""

    ev: Literal["procman"]
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


# -- process channel (host <-> the process manager, procman.py) ------------------------------
# Every request carries an `id` (added by ProcessManager.request); the reply is `done` with
# the fields below, or `failed` with `error` and `message`.


class PtySize(TypedDict):
    rows: int
    cols: int


class ProcStartRequest(TypedDict):
    op: Literal["proc_start"]
    id: NotRequired[str]
    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str | None
    tag: str | None
    pty: PtySize | None
    stdin: bool
    buffer_bytes: int
    max_procs: int


class ProcReadRequest(TypedDict):
    op: Literal["proc_read"]
    id: NotRequired[str]
    pid: int
    offset: int | None
    max_bytes: int


class ProcListRequest(TypedDict):
    op: Literal["proc_list"]
    id: NotRequired[str]


class ProcInputRequest(TypedDict):
    op: Literal["proc_input"]
    id: NotRequired[str]
    pid: int
    data: str


class ProcCloseStdinRequest(TypedDict):
    op: Literal["proc_close_stdin"]
    id: NotRequired[str]
    pid: int


class ProcSignalRequest(TypedDict):
    op: Literal["proc_signal"]
    id: NotRequired[str]
    pid: int
    signal: int


class ProcResizeRequest(TypedDict):
    op: Literal["proc_resize"]
    id: NotRequired[str]
    pid: int
    size: PtySize


class ProcStartReply(TypedDict):
    pid: int


class ProcReadReply(TypedDict):
    chunks: list[list[str]]  # [stream, base64], stream "stdout", "stderr" or "pty"
    offset: int
    next: int
    dropped: int
    running: bool
    exit_code: int | None
    signal: int | None


class ProcInfo(TypedDict):
    pid: int
    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str
    tag: str | None
    pty: PtySize | None
    running: bool


class ProcListReply(TypedDict):
    processes: list[ProcInfo]


class ProcHelloEvent(TypedDict):
    ev: Literal["hello"]
    protocol: int
    pid: int


ProcRequest = (
    ProcStartRequest
    | ProcReadRequest
    | ProcListRequest
    | ProcInputRequest
    | ProcCloseStdinRequest
    | ProcSignalRequest
    | ProcResizeRequest
)


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
    "context_create": ContextCreateRequest,
    "context_list": ContextListRequest,
    "context_select": ContextSelectRequest,
    "context_restart": ContextRestartRequest,
    "context_remove": ContextRemoveRequest,
    "entry": EntryRequest,
    "walk": WalkRequest,
    "rename": RenameRequest,
    "watch": WatchRequest,
    "watch_events": WatchEventsRequest,
    "unwatch": UnwatchRequest,
    "set_metadata": SetMetadataRequest,
    "pack": PackRequest,
    "unpack": UnpackRequest,
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
    "context_create": ContextReply,
    "context_list": ContextListReply,
    "context_select": ContextReply,
    "context_restart": NoReply,
    "context_remove": NoReply,
    "entry": EntryReply,
    "walk": WalkReply,
    "rename": EntryReply,
    "watch": WatchReply,
    "watch_events": WatchEventsReply,
    "unwatch": NoReply,
    "set_metadata": EntryReply,
    "pack": PackReply,
    "unpack": UnpackReply,
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
    "start_procman": StartProcmanRequest,
    "kernel": KernelEvent,
    "procman": ProcmanEvent,
    "exit": ExitEvent,
    "error": SetupErrorEvent,
}
PROC_REQUESTS: dict[str, type[Any]] = {
    "proc_start": ProcStartRequest,
    "proc_read": ProcReadRequest,
    "proc_list": ProcListRequest,
    "proc_input": ProcInputRequest,
    "proc_close_stdin": ProcCloseStdinRequest,
    "proc_signal": ProcSignalRequest,
    "proc_resize": ProcResizeRequest,
}
PROC_REPLIES: dict[str, type[Any]] = {
    "proc_start": ProcStartReply,
    "proc_read": ProcReadReply,
    "proc_list": ProcListReply,
    "proc_input": NoReply,
    "proc_close_stdin": NoReply,
    "proc_signal": NoReply,
    "proc_resize": NoReply,
}
SETUP: dict[str, type[Any]] = {"init": InitEvent, "error": SetupErrorEvent}
TEMPLATE: dict[str, type[Any]] = {op: TemplateRequest for op in ("spawn", "reap", "ping")}
