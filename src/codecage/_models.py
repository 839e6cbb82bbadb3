"""What a run returns: Execution and its parts (close to E2B's code-interpreter SDK)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

KilledBy = Literal["timeout", "memory_limit", "cpu_limit", "seccomp", "signal"]

# MIME type -> attribute name on Result
MIME_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/svg+xml": "svg",
    "text/latex": "latex",
    "application/json": "json",
    # structured results (docs/protocol.md): a matplotlib figure's chart data, a DataFrame
    "application/vnd.codecage.chart+json": "chart",
    "application/vnd.codecage.data+json": "data",
}


@dataclass
class ExecutionError:
    """An exception raised by user code: its class name, message and formatted traceback."""

    name: str
    value: str
    traceback: str


@dataclass
class Finding:
    """What static analysis saw in code before it ran: a rule id (e.g. "CC101"), a severity
    ("low", "medium", "high"), where (line, column, 1-based line) and what."""

    rule: str
    severity: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.rule} {self.severity} line {self.line}: {self.message}"


@dataclass
class Logs:
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class Result:
    """One rich output (a MIME bundle). `.png`/`.jpeg` are base64 strings."""

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    png: str | None = None
    jpeg: str | None = None
    svg: str | None = None
    latex: str | None = None
    json: Any = None
    chart: dict[str, Any] | None = None  # E2B's Result.chart: type, title, elements, axes
    data: dict[str, Any] | None = None  # a DataFrame as {column: [values]}
    is_main_result: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_bundle(cls, bundle: dict[str, Any], is_main_result: bool) -> Result:
        known = {MIME_FIELDS[k]: v for k, v in bundle.items() if k in MIME_FIELDS}
        for name in ("chart", "data"):  # objects, or nothing: the sandbox's word is untrusted
            if name in known and not isinstance(known[name], dict):
                del known[name]
        extra = {k: v for k, v in bundle.items() if k not in MIME_FIELDS}
        return cls(**known, is_main_result=is_main_result, extra=extra)

    def __repr__(self) -> str:
        main = ", main" if self.is_main_result else ""
        text = self.text if self.text is None or len(self.text) < 60 else self.text[:57] + "..."
        return f"Result(text={text!r}, formats={self.formats()}{main})"

    def formats(self) -> list[str]:
        """The representations present besides plain text, e.g. ["png"] or ["html"]."""
        names = [n for n in MIME_FIELDS.values() if n != "text" and getattr(self, n) is not None]
        return names + list(self.extra)


@dataclass
class Execution:
    """The outcome of running code. User-code failures and limits hit are values here."""

    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None
    duration_ms: float = 0.0
    exit_code: int | None = None
    killed_by: KilledBy | None = None
    limits_hit: list[str] = field(default_factory=list)
    truncated: bool = False
    peak_memory_mb: float | None = None
    state_lost: bool = False
    findings: list[Finding] = field(default_factory=list)

    @property
    def text(self) -> str | None:
        """text/plain of the main result, or None."""
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["text"] = self.text
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Execution:
        """The inverse of to_dict (used by the remote SDK)."""
        error = data.get("error")
        logs = data.get("logs") or {}
        return cls(
            results=[
                Result(**{k: v for k, v in r.items() if k in Result.__dataclass_fields__})
                for r in data.get("results") or []
            ],
            logs=Logs(list(logs.get("stdout") or []), list(logs.get("stderr") or [])),
            error=ExecutionError(error["name"], error["value"], error["traceback"])
            if error
            else None,
            execution_count=data.get("execution_count"),
            duration_ms=float(data.get("duration_ms") or 0.0),
            exit_code=data.get("exit_code"),
            killed_by=data.get("killed_by"),
            limits_hit=list(data.get("limits_hit") or []),
            truncated=bool(data.get("truncated")),
            peak_memory_mb=data.get("peak_memory_mb"),
            state_lost=bool(data.get("state_lost")),
            findings=[Finding(**f) for f in data.get("findings") or []],
        )
