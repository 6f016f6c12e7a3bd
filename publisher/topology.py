"""Which Redis a URL names (docs/redis.md): `redis://`, `rediss://`, Sentinel, Cluster.

One Redis, a Redis Cluster and a Sentinel-managed primary all hide behind
one `--redis-url`, and the node, `Publisher`, `AsyncPublisher` and hubctl
must read it the same way: `parse` turns a URL (and the CA / certificate /
key paths) into a `Target`, refusing what can never connect before any
socket is opened. Pure: no I/O, so `Config` can check a URL the moment it is
given; asking the servers and building clients is `publisher.redis_clients`.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from publisher.core import default_url, redact_url

__all__ = ["FORMS", "Address", "Kind", "Target", "TopologyError", "env_tls", "parse", "publisher_target"]

Kind = Literal["single", "cluster", "sentinel"]
Address = tuple[str, int]

FORMS = ("redis://[[user]:password@]host[:port][/db], rediss://… (TLS), "
         "redis+sentinel://[[user]:password@]host:port[,host:port…]/<master name>[/db], "
         "redis+cluster://host:port[,host:port…], or unix:///path/to/redis.sock")

_SCHEMES = {"redis": ("single", False), "rediss": ("single", True), "unix": ("single", False),
            "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
            "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True)}


class TopologyError(ValueError):
    """The URL or the servers it names cannot be used; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed `--redis-url` with its TLS files."""

    url: str
    kind: Kind
    tls: bool
    hosts: tuple[Address, ...] = ()
    unix_path: str = ""
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        """True on a Redis Cluster: room, user, node and `all` channels use SPUBLISH/SSUBSCRIBE."""
        return self.kind == "cluster"

    @property
    def single_url(self) -> str:
        """A redis:// (or rediss://) URL of the first host, with the credentials, db and options."""
        if self.unix_path:
            return self.url
        host, port = self.hosts[0]
        return _url("rediss" if self.tls else "redis", host, port, self, f"/{self.db}")

    def with_kind(self, kind: Kind) -> Target:
        return replace(self, kind=kind)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS settings of every connection to this Redis (None without TLS)."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ca)
        if self.options.get("ssl_check_hostname", "").lower() in ("0", "false", "no", "off"):
            context.check_hostname = False  # as redis-py does for the command connections
        if self.options.get("ssl_cert_reqs", "").lower() in ("none", "optional"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE if self.options["ssl_cert_reqs"].lower() == "none" \
                else ssl.CERT_OPTIONAL
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context

    def connection_kwargs(self) -> dict[str, Any]:
        """What redis-py needs, besides host and port, to open one connection to this Redis."""
        kwargs: dict[str, Any] = {"username": self.username, "password": self.password}
        if self.tls:
            kwargs.update(ssl=True, ssl_ca_certs=self.ca, ssl_certfile=self.cert, ssl_keyfile=self.key)
            for name in ("ssl_cert_reqs", "ssl_check_hostname"):
                if name in self.options:
                    value = self.options[name]
                    kwargs[name] = value.lower() in ("1", "true", "yes", "on") \
                        if name == "ssl_check_hostname" else value
        return kwargs


def _url(scheme: str, host: str, port: int, target: Target, path: str) -> str:
    auth = ""
    if target.password is not None or target.username:
        auth = quote(target.username or "", safe="")
        if target.password is not None:
            auth += ":" + quote(target.password, safe="")
        auth += "@"
    shown = f"[{host}]" if ":" in host else host
    options = {k: v for k, v in target.options.items() if k != "db"}
    query = f"?{urlencode(options)}" if options else ""
    return f"{scheme}://{auth}{shown}:{port}{path}{query}"


def env_tls() -> tuple[str | None, str | None, str | None]:
    """HUB_REDIS_CA, HUB_REDIS_CERT, HUB_REDIS_KEY (an empty variable counts as unset)."""
    return (os.environ.get("HUB_REDIS_CA") or None, os.environ.get("HUB_REDIS_CERT") or None,
            os.environ.get("HUB_REDIS_KEY") or None)


def publisher_target(url: str | None, ca: str | None, cert: str | None, key: str | None) -> Target:
    """A publisher's Target: its arguments, else HUB_REDIS_URL and HUB_REDIS_CA/CERT/KEY, else the default URL."""
    env_ca, env_cert, env_key = env_tls()
    return parse(url or default_url(), ca=ca or env_ca, cert=cert or env_cert, key=key or env_key)


def parse(url: str, *, ca: str | None = None, cert: str | None = None, key: str | None = None) -> Target:
    """A Target, or TopologyError saying in one line what is wrong with the URL."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in _SCHEMES:
        raise TopologyError(f"expected {FORMS}")
    kind, tls = _SCHEMES[scheme]
    if (ca or cert or key) and not tls:
        raise TopologyError("--redis-ca, --redis-cert and --redis-key need a TLS URL (rediss://, "
                            "rediss+sentinel://, rediss+cluster://)")
    if key and not cert:
        raise TopologyError("--redis-key needs --redis-cert")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise TopologyError(f"not a usable Redis URL ({exc}); expected {FORMS}") from None
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    username = unquote(parts.username) if parts.username else options.get("username") or None
    password = unquote(parts.password) if parts.password is not None else options.get("password")
    common: dict[str, Any] = {"url": url, "kind": kind, "tls": tls, "username": username, "password": password,
                              "ca": ca or options.get("ssl_ca_certs"), "cert": cert or options.get("ssl_certfile"),
                              "key": key or options.get("ssl_keyfile"), "options": options}
    if scheme == "unix":
        if not parts.path:
            raise TopologyError(f"the URL names no socket path; expected {FORMS}")
        return Target(unix_path=parts.path, db=_db(options.get("db", "0")), **common)
    hosts = _hosts(parts.netloc.rpartition("@")[2], many=kind != "single")
    path = [p for p in parts.path.split("/") if p]
    if kind == "sentinel":
        if not path:
            raise TopologyError("the URL names no primary: expected "
                                "redis+sentinel://host:port[,host:port…]/<master name>[/db]")
        if len(path) > 2:
            raise TopologyError(f"too many path parts in {redact_url(url)!r}: expected /<master name>[/db]")
        return Target(hosts=hosts, master=unquote(path[0]), db=_db(path[1] if len(path) > 1 else "0"), **common)
    if kind == "cluster":
        if path and path != ["0"]:
            raise TopologyError("a Redis Cluster has only database 0: expected redis+cluster://host:port[,host:port…]")
        return Target(hosts=hosts, **common)
    if len(path) > 1:
        raise TopologyError(f"the database {'/'.join(path)!r} is not a number 0 or more; expected {FORMS}")
    return Target(hosts=hosts, db=_db(path[0] if path else options.get("db", "0")), **common)


def _db(text: str) -> int:
    if not text.isdigit():
        raise TopologyError(f"the database {text!r} is not a number 0 or more; expected {FORMS}")
    return int(text)


def _hosts(netloc: str, many: bool) -> tuple[Address, ...]:
    found: list[Address] = []
    for item in netloc.split(",") if many else [netloc]:
        try:
            parts = urlsplit(f"//{item}")
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise TopologyError(f"{item!r} is not host:port ({exc}); expected {FORMS}") from None
        if not host:
            raise TopologyError(f"the URL names no host; expected {FORMS}")
        found.append((host, port or 6379))
    return tuple(found)
