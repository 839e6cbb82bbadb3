"""Sandbox text on its way to a terminal: the one filter every such path uses.

Output, tracebacks, results, approval subjects and audit records are written by code the
operator does not control; a terminal would obey what they carry. Removed:

- CSI sequences whole (ESC [ or U+009B, parameters, final byte: colours, cursor moves,
  clearing the screen), and the short escapes (ESC, at most one intermediate, a final);
- every other C0 control but tab and newline (carriage return included: it overwrites
  what the line said), DEL, and the C1 controls U+0080-U+009F, which many terminals obey
  exactly as ESC-prefixed ones (U+009D is OSC, U+0090 DCS, U+009E PM, U+009F APC);
- the bidirectional formatting characters (embeddings and overrides U+202A-U+202E,
  isolates U+2066-U+2069, the marks U+200E, U+200F and U+061C), which make text display
  in another order than it reads (code in an approval prompt that is not what runs).

The payload of a string sequence (OSC, DCS, PM, APC: a title, a hyperlink) is never removed,
only its introducer and terminator: a removed string could hide arbitrary text, such as a
line of code in an approval subject. What is left of a sequence split across two writes is
plain text. `changed` tells an approval prompt to say that what it shows was filtered.
"""

from __future__ import annotations

import re
from typing import TextIO

_FILTER = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI, 7- and 8-bit
    r"|\x1b[ -/]?[0-~]"  # the short escapes, and the introducers of OSC, DCS, PM, APC, ST
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # the other C0 controls but \t and \n, DEL, C1
    r"|[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"  # bidirectional formatting
)


def clean(text: str) -> str:
    """`text` with nothing a terminal would act on (see the module's docstring)."""
    return _FILTER.sub("", text)


def changed(text: str) -> bool:
    """Whether `clean` removes anything from `text`."""
    return _FILTER.search(text) is not None


def for_stream(stream: TextIO, text: str) -> str:
    """`text` as written to `stream`: cleaned for a terminal, as it is for a file or pipe."""
    return clean(text) if stream.isatty() else text
