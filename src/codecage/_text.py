"""Text that can always be encoded: lone surrogates are made valid where text crosses a boundary.

JSON allows `"\\ud800"`, and Python decodes it to a str that UTF-8 (SQLite, HTTP responses,
a terminal) refuses to encode. Text from a tenant or a sandbox is therefore either refused
(the API: `has_lone_surrogate`) or made valid (`valid`, `valid_deep`) before it reaches code
that encodes it.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def valid(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD (a pair becomes its character)."""
    if _encodable(text):
        return text
    # Through UTF-16: a high+low pair joins into one character, a lone half is replaced.
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def valid_deep(value: Any) -> Any:
    """`value` (parsed JSON) with every string, keys included, made valid. Containers are
    changed in place (no recursion: a frame nested as deep as JSON allows is fine)."""
    if isinstance(value, str):
        return valid(value)
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, item in list(node.items()):
                if isinstance(item, str):
                    if not _encodable(item):
                        node[key] = valid(item)
                elif isinstance(item, (dict, list)):
                    stack.append(item)
                if isinstance(key, str) and not _encodable(key):
                    node[valid(key)] = node.pop(key)
        elif isinstance(node, list):
            for index, item in enumerate(node):
                if isinstance(item, str):
                    if not _encodable(item):
                        node[index] = valid(item)
                elif isinstance(item, (dict, list)):
                    stack.append(item)
    return value


def has_lone_surrogate(value: Any) -> bool:
    """Does any string in `value` (str, or parsed JSON) hold a surrogate code point?"""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if not _encodable(node):
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return False
