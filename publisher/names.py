"""Room-name and user-id rules shared by the node and every publisher.

The rules (1-128 characters, no control characters, no whitespace, no curly
braces) keep names safe inside Redis keys: braces are Redis Cluster hash-tag
delimiters, and whitespace or control characters would make `redis-cli`
output ambiguous.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["MAX_NAME_LENGTH", "check_name", "is_valid_name", "matches_any"]

MAX_NAME_LENGTH = 128
_FORBIDDEN = re.compile(r"[\s{}\x00-\x1f\x7f-\x9f]")


def check_name(value: Any) -> str | None:
    """Return why `value` is not a valid room name or user id, or None if it is."""
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "must not be empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters"
    if _FORBIDDEN.search(value):
        return "must not contain whitespace, control characters, '{' or '}'"
    return None


def is_valid_name(value: Any) -> bool:
    """True when `value` may be used as a room name or user id."""
    return check_name(value) is None


def matches_any(patterns: Iterable[str], name: str) -> bool:
    """Whether `name` is one of `patterns`: exact names, or `prefix*` for every name with that prefix.

    The one pattern language of hubnode: a token's `rooms` claim and `--history-rooms`.
    """
    for pattern in patterns:
        if pattern.endswith("*"):
            if name.startswith(pattern[:-1]):
                return True
        elif name == pattern:
            return True
    return False
