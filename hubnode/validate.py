"""What each setting accepts: one rule per Config field, shared by `Config` and the parser.

A bad value must be refused before anything starts, with one line that names
the setting and what it accepts: a node that starts and then fails (a port it
cannot bind, a Redis URL redis-py chokes on at connect time, a NaN heartbeat
that never fires) is worse than one that does not start. The same rules run
for Python callers (`Config(port=99999)` raises `ConfigError`) and for flags
and `HUB_*` variables (`parse` turns the text into a value first).

Pure: no I/O. Checks that must read a file (the JWT public key) are made by
the command line before the node starts (hubnode.cli).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from publisher.core import redact_url
from publisher.history import MAX_SIZE as MAX_HISTORY_SIZE
from publisher.history import parse_patterns
from publisher.keys import check_prefix
from publisher.topology import parse as parse_target

__all__ = ["RULES", "Invalid", "Rule", "integer", "shown", "whole"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# scheme://host[:port], no path: browsers send http(s) origins, but also capacitor://localhost,
# chrome-extension://<id> and the like; a path or trailing slash could never match an Origin header
_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(:\d{1,5})?")
_REDIS_URL_FORMS = ("redis://[[user]:password@]host[:port][/db], rediss://… (TLS), "
                    "redis+sentinel://host:port[,host:port…]/<master name>[/db], "
                    "redis+cluster://host:port[,host:port…] or unix:///path/to/socket[?db=N]")


class Invalid(ValueError):
    """A value a setting does not accept; the message says what it accepts."""


@dataclass(frozen=True)
class Rule:
    """How one setting reads from text, and what values it accepts.

    `convert` turns command-line or environment text into a value (raising
    Invalid); `check` accepts or refuses a value however it was given.
    """

    convert: Callable[[str], Any]
    check: Callable[[Any], None]

    def parse(self, text: str) -> Any:
        value = self.convert(text)
        self.check(value)
        return value


# -- converters (text -> value) ----------------------------------------------------

def _text(text: str) -> str:
    return text


def integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise Invalid("expected a whole number") from None


def _number(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise Invalid("expected a number") from None


def to_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise Invalid("expected on/1/true/yes or off/0/false/no")


def to_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


# -- checks (value -> None or Invalid) -----------------------------------------------

def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def whole(low: int, high: int | None = None, meaning: str = "") -> Callable[[Any], None]:
    """An int in [low, high]; `meaning` explains a special value, e.g. '0 = unlimited'."""
    accepted = f"a whole number from {low} to {high}" if high is not None else f"a whole number, {low} or more"
    accepted += f" ({meaning})" if meaning else ""

    def check(value: Any) -> None:
        if not (isinstance(value, int) and not isinstance(value, bool)) or value < low or (
                high is not None and value > high):
            raise Invalid(f"expected {accepted}")
    return check


def amount(positive: bool, unit: str = "seconds", meaning: str = "") -> Callable[[Any], None]:
    """A finite number, > 0 or >= 0 (NaN and infinity never work as a period or a rate)."""
    accepted = f"a number of {unit} greater than 0" if positive else f"a number of {unit}, 0 or more"
    accepted += f" ({meaning})" if meaning else ""

    def check(value: Any) -> None:
        if not _is_number(value) or not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise Invalid(f"expected {accepted}")
    return check


def choice(*options: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value not in options:
            raise Invalid(f"expected one of {', '.join(options)}")
    return check


def boolean(value: Any) -> None:
    if not isinstance(value, bool):
        raise Invalid("expected on/1/true/yes or off/0/false/no")


def optional_bool(value: Any) -> None:
    if value is not None:
        boolean(value)


def host(value: Any) -> None:
    """An IP address or a DNS name: what the listening socket can bind."""
    if isinstance(value, str) and value:
        try:
            ipaddress.ip_address(value)
            return
        except ValueError:
            labels = value.rstrip(".").split(".")
            if len(value) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels):
                return
    raise Invalid("expected an IP address (127.0.0.1, 0.0.0.0, ::) or a host name")


def node_id(value: Any) -> None:
    if not (isinstance(value, str) and _NODE_ID.fullmatch(value)):
        raise Invalid("expected 1-64 letters, digits, '.', '_' or '-'")


def key_prefix(value: Any) -> None:
    problem = check_prefix(value)
    if problem:
        raise Invalid(problem)


def text(what: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and not (isinstance(value, str) and value.strip()):
            raise Invalid(f"expected {what}")
    return check


def jwt_secret(value: Any) -> None:
    if value is not None and not (isinstance(value, str) and len(value.encode()) >= 32):
        raise Invalid("expected a secret of at least 32 bytes (RFC 7518 section 3.2)")


def origins(value: Any) -> None:
    """Exact browser origins (compared as strings, so a trailing slash would never match), or '*'."""
    if value is None:
        return
    if not (isinstance(value, tuple) and value):
        raise Invalid("expected '*' or origins like https://app.example.com (a tuple of strings in Python, "
                      "a comma-separated list on the command line)")
    for origin in value:
        if origin != "*" and not (isinstance(origin, str) and _ORIGIN.fullmatch(origin)):
            raise Invalid(f"{origin!r} is not an origin: expected '*' or origins like "
                          "https://app.example.com or http://localhost:3000 (scheme, host, port; no path)")


def api_keys(value: Any) -> None:
    if not isinstance(value, tuple):
        raise Invalid("expected keys without whitespace (a tuple of strings in Python, a comma-separated "
                      "list on the command line)")
    if any(not isinstance(k, str) or not k or any(c.isspace() for c in k) for k in value):
        raise Invalid("expected one or more comma-separated keys without whitespace")


def _key_list(text: str) -> tuple[str, ...]:
    """From text, an empty list is a mistake: `--api-key ""` would silently leave the API open."""
    keys = to_list(text)
    if not keys:
        raise Invalid("expected one or more comma-separated keys without whitespace")
    return keys


# The URL options redis-py understands, and the kind of value each takes (redis-py
# would refuse a bad one only when it connects; `ssl_*` options are passed through).
_REDIS_QUERY: dict[str, Callable[[str], Any]] = {
    "db": int, "protocol": int, "max_connections": int, "health_check_interval": int, "socket_read_size": int,
    "socket_timeout": float, "socket_connect_timeout": float, "timeout": float,
    "socket_keepalive": to_bool, "retry_on_timeout": to_bool, "readonly": to_bool, "legacy_responses": to_bool,
    "client_name": str, "username": str, "password": str, "retry_on_error": str,
}


def redis_url(value: Any) -> None:
    """What redis-py can connect to, checked now rather than at the first connect."""
    if value is None:
        return
    if not isinstance(value, str):
        raise Invalid(f"expected {_REDIS_URL_FORMS}")
    scheme = value.partition("://")[0].lower() if "://" in value else ""
    if scheme not in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster",
                      "rediss+cluster"):
        raise Invalid(f"expected {_REDIS_URL_FORMS}")
    try:
        parts = urlsplit(value)
        if "+" not in scheme:
            parts.port  # noqa: B018 - raises ValueError when out of range
    except ValueError as exc:
        raise Invalid(f"not a usable Redis URL ({exc}); expected {_REDIS_URL_FORMS}") from None
    if "+" in scheme:
        try:
            parse_target(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
    elif scheme == "unix":
        if not parts.path:
            raise Invalid(f"the URL names no socket path; expected {_REDIS_URL_FORMS}")
    else:
        if not parts.hostname:
            raise Invalid(f"the URL names no host; expected {_REDIS_URL_FORMS}")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise Invalid(f"the database {db!r} is not a number 0 or more; expected {_REDIS_URL_FORMS}")
    for key, option in parse_qsl(parts.query, keep_blank_values=True):
        convert = _REDIS_QUERY.get(key)
        if convert is None and not key.startswith("ssl_") and key != "sentinel_password":
            raise Invalid(f"unknown URL option {key!r}; expected one of {', '.join(sorted(_REDIS_QUERY))}, ssl_*")
        try:
            if convert is not None:
                convert(option)
        except ValueError:
            kind = {int: "a whole number", float: "a number"}.get(convert, "on/off")  # type: ignore[call-overload]
            raise Invalid(f"URL option {key}={option!r}: expected {kind}") from None


_SECRETS = {"jwt_secret", "api_key"}


def shown(name: str, value: Any) -> str:
    """`value` as an error message may quote it: secrets are never echoed, a URL's password is masked."""
    if name in _SECRETS:
        return "(hidden)"
    if name == "redis_url" and isinstance(value, str):
        value = redact_url(value)
    return repr(value)




def history_rooms(value: Any) -> None:
    try:
        parse_patterns(value if isinstance(value, str | tuple | list) else "")
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def presence_rooms(value: Any) -> None:
    """Like --history-rooms, but empty (the default) is allowed: no room announces presence."""
    if isinstance(value, tuple | list) and not value:
        return
    history_rooms(value)


def log_level(value: Any) -> None:
    choice("debug", "info", "warning", "error")(value)


def _lower(text: str) -> str:
    return text.strip().lower()


_POSITIVE_BYTES = whole(1)
_NON_NEGATIVE = whole(0)

RULES: dict[str, Rule] = {
    "host": Rule(_text, host),
    "port": Rule(integer, whole(0, 65535, "0 picks a free port")),
    "redis_url": Rule(_text, redis_url),
    "redis_ca": Rule(_text, text("the path of a PEM file")),
    "redis_cert": Rule(_text, text("the path of a PEM file")),
    "redis_key": Rule(_text, text("the path of a PEM file")),
    "node_id": Rule(_text, node_id),
    "key_prefix": Rule(_text, key_prefix),
    "auth": Rule(_lower, choice("none", "jwt")),
    "allow_anonymous": Rule(to_bool, boolean),
    "allowed_origins": Rule(to_list, origins),
    "api_key": Rule(_key_list, api_keys),
    "jwt_secret": Rule(_text, jwt_secret),
    "jwt_public_key": Rule(_text, text("the path of a PEM file")),
    "jwt_audience": Rule(_text, text("the required 'aud' value")),
    "jwt_issuer": Rule(_text, text("the required 'iss' value")),
    "jwt_leeway": Rule(_number, amount(False)),
    "client_broadcast": Rule(to_bool, optional_bool),
    "client_private": Rule(to_bool, boolean),
    "max_message_bytes": Rule(integer, _POSITIVE_BYTES),
    "max_outbound_bytes": Rule(integer, _POSITIVE_BYTES),
    "compression": Rule(to_bool, boolean),
    "compress_min_bytes": Rule(integer, _NON_NEGATIVE),
    "max_rooms_per_conn": Rule(integer, whole(1)),
    "max_connections": Rule(integer, whole(0, meaning="0 = unlimited")),
    "max_connections_per_user": Rule(integer, whole(0, meaning="0 = unlimited")),
    "rate": Rule(_number, amount(False, "frames per second", "0 = off")),
    "burst": Rule(integer, whole(1)),
    "max_errors": Rule(integer, _NON_NEGATIVE),
    "heartbeat": Rule(_number, amount(True)),
    "unsubscribe_grace": Rule(_number, amount(False)),
    "drain_timeout": Rule(_number, amount(True)),
    "ping_interval": Rule(_number, amount(False, "0 = off")),
    "ping_timeout": Rule(_number, amount(True)),
    "redis_timeout": Rule(_number, amount(True)),
    "max_envelope_bytes": Rule(integer, _POSITIVE_BYTES),
    "dedup_window": Rule(_number, amount(False, "0 = off")),
    "history_size": Rule(integer, whole(0, MAX_HISTORY_SIZE, "0 = off")),
    "history_ttl": Rule(integer, whole(1)),
    "history_rooms": Rule(to_list, history_rooms),
    "history_users": Rule(to_bool, boolean),
    "presence_rooms": Rule(to_list, presence_rooms),
    "log_level": Rule(_lower, log_level),
    "log_format": Rule(_lower, choice("text", "json")),
}
"""One rule per Config field (a test checks that none is missing)."""
