"""What keeps sandbox-made content inert in the console: the response headers (a strict
Content-Security-Policy: scripts and styles from the console's own static files only),
the check that an image is a PNG or a JPEG before it is served as one, and the findings
marked on the lines of code (text only: the templates escape everything)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # (no-referrer makes a form's Origin "null")
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# An image is served under its own, stricter policy: nothing in it may run or load.
IMAGE_HEADERS = {
    **HEADERS,
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Content-Disposition": "inline",
}
PNG = b"\x89PNG\r\n\x1a\n"
JPEG = b"\xff\xd8\xff"


def image_type(data: bytes, declared: str) -> str | None:
    """The MIME type to serve `data` as, if it is the PNG or JPEG it was declared to be
    (by its signature); None: not served as an image."""
    if declared == "image/png" and data.startswith(PNG) and len(data) > len(PNG) + 8:
        return "image/png"
    if (
        declared == "image/jpeg"
        and data.startswith(JPEG)
        and data.rstrip(b"\0").endswith(b"\xff\xd9")
    ):
        return "image/jpeg"
    return None


@dataclass
class Line:
    number: int
    text: str
    findings: list[str] = field(default_factory=list)


def code_lines(code: str, findings: list[Any]) -> list[Line]:
    """The code as numbered lines, each with the findings (rule, severity, message) on it;
    a finding on no line of the code goes on the first."""
    lines = [Line(i, text) for i, text in enumerate(code.split("\n"), start=1)]
    for finding in findings:
        item = finding if isinstance(finding, dict) else vars(finding)
        number = item.get("line")
        index = number - 1 if isinstance(number, int) and 0 < number <= len(lines) else 0
        label = f"{item.get('rule', '')} {item.get('severity', '')}: {item.get('message', '')}"
        lines[index].findings.append(label)
    return lines
