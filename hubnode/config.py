"""Node configuration: one frozen dataclass, read from flags and `HUB_*` variables.

Pure: no I/O besides reading the mapping of environment variables given to it.
Every flag `--some-flag` also reads `HUB_SOME_FLAG`; a flag on the command line
wins over the environment.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from hubnode.validate import RULES, Invalid, shown
from publisher.envelope import MAX_ENVELOPE_BYTES
from publisher.history import HistoryPolicy
from publisher.keys import DEFAULT_PREFIX
from publisher.names import matches_any
from publisher.topology import Target, TopologyError
from publisher.topology import parse as parse_target
from publisher.usage import OneLineParser

__all__ = ["Config", "ConfigError", "build_parser", "parse_args"]

_BOOLS = {"allow_anonymous", "client_broadcast", "client_private", "history_users", "compression"}
_METAVARS = {"host": "ADDRESS", "port": "PORT", "redis_url": "URL", "node_id": "ID", "key_prefix": "PREFIX",
             "auth": "none|jwt", "allowed_origins": "ORIGINS", "api_key": "KEYS", "jwt_secret": "SECRET",
             "jwt_public_key": "FILE", "redis_ca": "FILE", "redis_cert": "FILE", "redis_key": "FILE",
             "jwt_audience": "AUD", "jwt_issuer": "ISS",
             "log_level": "LEVEL", "log_format": "text|json",
             "history_rooms": "PATTERNS", "history_ttl": "SECONDS", "presence_rooms": "PATTERNS"}


class ConfigError(ValueError):
    """The configuration cannot work; the message says what to change."""


def default_max_connections() -> int:
    """What one node process can hold: its open-files limit, less 1,000 for Redis, HTTP and files.

    The node raises its soft limit to the hard one when it starts (hubnode.serve), so
    the hard limit is the one that counts; a fixed 10,000 left most of a 20,000 limit unused.
    """
    try:
        import resource
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    except (ImportError, OSError, ValueError):  # not on a POSIX system
        return 10_000
    if hard == resource.RLIM_INFINITY:
        return 100_000
    return max(100, hard - 1_000)


def _default_node_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:40] or "node"
    return f"{host}-{os.urandom(3).hex()}"


@dataclass(frozen=True)
class Config:
    """Every setting of a node, with the defaults of docs/protocol.md."""

    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str | None = None
    redis_ca: str | None = None
    redis_cert: str | None = None
    redis_key: str | None = None
    node_id: str = field(default_factory=_default_node_id)
    key_prefix: str = DEFAULT_PREFIX
    auth: str = "none"
    allow_anonymous: bool = False
    allowed_origins: tuple[str, ...] | None = None
    api_key: tuple[str, ...] = ()
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = 5.0
    client_broadcast: bool | None = None  # default: on in auth none, off in auth jwt
    client_private: bool = True
    max_message_bytes: int = 65536
    max_outbound_bytes: int = 4 * 1024 * 1024
    compression: bool = True
    compress_min_bytes: int = 512
    max_rooms_per_conn: int = 100
    max_connections: int = field(default_factory=default_max_connections)
    max_connections_per_user: int = 32
    rate: float = 50.0
    burst: int = 100
    max_errors: int = 10
    heartbeat: float = 2.0
    unsubscribe_grace: float = 2.0
    drain_timeout: float = 10.0
    ping_interval: float = 25.0
    ping_timeout: float = 20.0
    redis_timeout: float = 5.0
    max_envelope_bytes: int = MAX_ENVELOPE_BYTES
    dedup_window: float = 60.0
    history_size: int = 0
    history_ttl: int = 300
    history_rooms: tuple[str, ...] = ("*",)
    history_users: bool = True
    presence_rooms: tuple[str, ...] = ()
    log_level: str = "info"
    log_format: str = "text"

    def __post_init__(self) -> None:
        # a list from Python code is as good as a tuple
        for name in ("allowed_origins", "api_key", "history_rooms", "presence_rooms"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for f in fields(self):  # each value alone: hubnode.validate says what every setting accepts
            value = getattr(self, f.name)
            try:
                RULES[f.name].check(value)
            except Invalid as exc:
                raise ConfigError(f"--{f.name.replace('_', '-')} {shown(f.name, value)}: {exc}") from None
        # then the settings that only make sense together
        if self.auth == "jwt" and not (self.jwt_secret or self.jwt_public_key):
            raise ConfigError("--auth jwt needs --jwt-secret (HS256) or --jwt-public-key FILE (RS256/ES256)")
        if self.jwt_secret and self.jwt_public_key:
            raise ConfigError("give either --jwt-secret or --jwt-public-key, not both")
        if self.redis_url is not None:
            try:
                self.redis_target()
            except TopologyError as exc:
                raise ConfigError(f"--redis-url {shown('redis_url', self.redis_url)}: {exc}") from None
        elif self.redis_ca or self.redis_cert or self.redis_key:
            raise ConfigError("--redis-ca, --redis-cert and --redis-key need --redis-url")
        if self.client_broadcast is None:
            object.__setattr__(self, "client_broadcast", self.auth == "none")

    def redis_target(self) -> Target:
        """The Redis (single, Sentinel-managed or Cluster) that `redis_url` and the TLS files name."""
        assert self.redis_url is not None
        return parse_target(self.redis_url, ca=self.redis_ca, cert=self.redis_cert, key=self.redis_key)

    @property
    def history(self) -> HistoryPolicy:
        """The node's history settings, in the form publishers share."""
        return HistoryPolicy(self.history_size, self.history_ttl, self.history_rooms, self.history_users)

    def announces(self, room: str) -> bool:
        """Whether members of `room` get presence events (--presence-rooms; every node must agree)."""
        return bool(self.presence_rooms) and matches_any(self.presence_rooms, room)

    @property
    def on_loopback(self) -> bool:
        return is_loopback(self.host)

    def check_exposure(self) -> None:
        """Refuse an anonymous node on a non-loopback address (docs/protocol.md 1 and 6)."""
        if self.on_loopback or self.allow_anonymous:
            return
        if self.auth == "none":
            raise ConfigError(f"refusing to listen on {self.host} with --auth none: anyone could "
                              "claim any user id; pass --allow-anonymous to accept that")
        if not self.api_key:
            raise ConfigError(f"refusing to serve the HTTP API on {self.host} without --api-key; "
                              "pass --allow-anonymous to accept that")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_HELP = {
    "host": "address to listen on",
    "port": "port to listen on",
    "redis_url": "Redis URL for cluster mode (redis://, rediss://, redis+sentinel://…/MASTER, "
                 "redis+cluster://); without it the node runs alone",
    "redis_ca": "PEM file of the CA that signed the Redis server certificates (rediss://)",
    "redis_cert": "PEM file of this node's client certificate for Redis (rediss://)",
    "redis_key": "PEM file of the key of --redis-cert",
    "node_id": "unique id of this node (default: hostname and random suffix)",
    "key_prefix": "prefix of every Redis key and channel",
    "auth": "identity mode: none (?user_id=) or jwt (?token= or Authorization: Bearer)",
    "allow_anonymous": "allow auth none / no API key on a non-loopback address",
    "allowed_origins": "comma-separated browser origins allowed to connect, or *",
    "api_key": "comma-separated keys required as Bearer on /broadcast and /api/*",
    "jwt_secret": "HS256 secret for --auth jwt (prefer HUB_JWT_SECRET)",
    "jwt_public_key": "PEM file with the RS256 or ES256 public key for --auth jwt",
    "jwt_audience": "required 'aud' claim",
    "jwt_issuer": "required 'iss' claim",
    "jwt_leeway": "seconds of clock skew allowed on exp/nbf",
    "client_broadcast": "let clients send 'broadcast' frames (default: on in auth none, off in jwt)",
    "client_private": "let clients send 'private_message' frames",
    "max_message_bytes": "largest client frame; larger closes with 1009",
    "max_outbound_bytes": "per-connection send buffer; past it the client is closed 1013",
    "compression": "accept permessage-deflate when a client offers it (--no-compression turns it off)",
    "compress_min_bytes": "messages smaller than this go uncompressed even to clients that negotiated deflate",
    "max_rooms_per_conn": "rooms one connection may join",
    "max_connections": "connections this node accepts (0 = unlimited; default: the open-files limit less "
                       "1000); over it: 503",
    "max_connections_per_user": "connections one user may hold cluster-wide (0 = unlimited); newest refused",
    "rate": "client frames per second per connection (0 = off)",
    "burst": "token bucket size for --rate",
    "max_errors": "errors in a row before close 1008",
    "heartbeat": "seconds between node heartbeats in Redis",
    "unsubscribe_grace": "seconds to keep an unused room/user channel subscribed",
    "drain_timeout": "seconds a shutdown may take",
    "ping_interval": "seconds between WebSocket pings to clients (0 = off)",
    "ping_timeout": "seconds a client may take to answer a ping before it is closed",
    "redis_timeout": "timeout of every Redis command, seconds",
    "max_envelope_bytes": "largest payload taken from Redis; larger ones are dropped, counted, and cause a resync",
    "dedup_window": "seconds a node remembers delivered envelope ids to drop a republished one (0 = off)",
    "history_size": "messages each room or user stream keeps for recovery (0 = off)",
    "history_ttl": "seconds after its last publish a stream's history expires",
    "history_rooms": "comma-separated room names or prefix* that keep history (default *)",
    "history_users": "whether user streams keep history (--no-history-users turns it off)",
    "presence_rooms": "comma-separated room names or prefix* whose members get presence join/leave events "
                      "(default none; give every node the same)",
    "log_level": "debug, info, warning or error",
    "log_format": "text or json",
}


def build_parser() -> OneLineParser:
    """The `hubnode` command line: one flag per Config field (`--some-flag`, dest `some_flag`), every
    default None so that `parse_args` can tell a flag given from one left to `HUB_SOME_FLAG` or the default."""
    parser = OneLineParser(prog="hubnode", description="Run a hubnode WebSocket hub node. Every flag also "
                     "reads HUB_<FLAG> from the environment; a flag on the command line wins.")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.name in _BOOLS:  # `--client-private` alone means on
            parser.add_argument(flag, nargs="?", const="on", default=None, metavar="on|off", help=_HELP[f.name])
        else:
            parser.add_argument(flag, default=None, metavar=_METAVARS.get(f.name, "N"), help=_HELP[f.name])
    parser.add_argument("--no-compression", dest="compression", action="store_const", const="off",
                        help="never negotiate permessage-deflate")
    parser.add_argument("--no-history-users", dest="history_users", action="store_const", const="off",
                        help="user streams keep no history")
    return parser


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build a Config from command-line flags and HUB_* environment variables.

    Every value is converted and checked here, each against its own rule
    (hubnode.validate), so a bad one exits 2 with one line naming the flag or
    the variable it came from, before anything starts. An empty variable
    counts as unset, as it does for the publishers.
    """
    env = os.environ if env is None else env
    parser = build_parser()
    ns = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields(Config):
        flag, var = "--" + f.name.replace("_", "-"), "HUB_" + f.name.upper()
        given, source = getattr(ns, f.name), flag
        if given is None:
            given, source = env.get(var), var
            if not given:  # unset, or set empty (`HUB_X=` in an .env file): the default, as publishers read it
                continue
        try:
            values[f.name] = RULES[f.name].parse(given)
        except Invalid as exc:
            quoted = shown(f.name, given)
            parser.error(f"{source} {quoted}: {exc}" if source == flag else f"{source}={quoted}: {exc}")
    try:
        return Config(**values)
    except ConfigError as exc:
        parser.error(str(exc))
