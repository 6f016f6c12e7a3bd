"""Every flag and HUB_* variable refuses a bad value at parse time: one line, exit 2, no traceback.

Issue 12 found `--port 99999` logging one port while binding another, `HUB_PORT=-1`
"starting" and then failing, and tracebacks for `--redis-url http://x` and
`--log-level loud`. Each bad value below goes through `hubnode.cli.main`
exactly as the console script runs it (tests/integration/test_cli.py runs a
few as real processes).
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pytest

from hubnode import cli
from hubnode.config import Config, ConfigError, parse_args
from hubnode.validate import RULES

BAD: dict[str, list[str]] = {
    "host": ["a b", "", "exa mple.com", "-bad-.example"],
    "port": ["99999", "-1", "eighty", "80.5", "65536"],
    "redis_url": ["redis+sentinel://x", "http://x", "redis://h:99999/0", "redis://h/x", "redis://h/0?foo=1",
                  "redis://h/0?socket_timeout=soon", "localhost:6379", "redis://:1/0", "unix://",
                  "redis+sentinel://h:26379", "redis+cluster://h:7000/2", "redis+cluster://h:x"],
    "redis_ca": ["", " "],
    "redis_cert": [""],
    "redis_key": [" "],
    "node_id": ["a b", "x" * 65, "", "node/1"],
    "key_prefix": ["a b", "{x}:", "", "x" * 65],
    "auth": ["ldap", ""],
    "allow_anonymous": ["maybe", "2"],
    "allowed_origins": ["https://a.example/", "a.example", "", "https://a.example/path", "null"],
    "api_key": ["", "a b", ","],
    "jwt_secret": ["short"],
    "jwt_public_key": ["", " "],
    "jwt_audience": [" "],
    "jwt_issuer": [""],
    "jwt_leeway": ["-1", "inf", "nan", "soon"],
    "client_broadcast": ["sometimes"],
    "client_private": ["2"],
    "max_message_bytes": ["0", "1k", "-5"],
    "max_outbound_bytes": ["0", "4MiB"],
    "compression": ["gzip", ""],
    "compress_min_bytes": ["-1", "half"],
    "max_rooms_per_conn": ["0", "many"],
    "max_connections": ["-1", "1e4"],
    "max_connections_per_user": ["-1"],
    "rate": ["-1", "nan", "inf", "fast"],
    "burst": ["0", "-1", "1.5"],
    "max_errors": ["-1"],
    "heartbeat": ["0", "nan", "inf", "-2"],
    "unsubscribe_grace": ["-1", "nan"],
    "drain_timeout": ["0", "inf"],
    "ping_interval": ["-1", "nan"],
    "ping_timeout": ["0"],
    "redis_timeout": ["0", "-1"],
    "max_envelope_bytes": ["0"],
    "dedup_window": ["-1", "inf"],
    "history_size": ["-1", "1.5", "10001", "many"],
    "history_ttl": ["0", "-5", "1.5"],
    "history_rooms": ["a*b", "**", "a b", ","],
    "presence_rooms": ["a*b", "**", "a b", "{x}"],
    "history_users": ["maybe", ""],
    "log_level": ["loud", ""],
    "log_format": ["xml"],
}

SECRET_FIELDS = {"jwt_secret", "api_key"}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def cases() -> list[tuple[str, str, str]]:
    """Each bad value as a flag and as a variable (an empty variable means unset: see below)."""
    return [(name, value, how) for name, values in BAD.items() for value in values for how in ("flag", "env")
            if how == "flag" or value]


def test_every_setting_has_a_rule_and_bad_values() -> None:
    """A new setting must come with its rule and with bad values in this table."""
    names = {f.name for f in fields(Config)}
    assert set(RULES) == names
    assert set(BAD) == names


@pytest.mark.parametrize(("name", "value", "how"), cases())
def test_bad_value_is_one_line_and_exit_2(name: str, value: str, how: str, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The line names the flag (or variable) and says what it accepts; secrets are not echoed."""
    for f in fields(Config):
        monkeypatch.delenv("HUB_" + f.name.upper(), raising=False)
    if how == "flag":
        argv = [f"{flag(name)}={value}"]  # `=`: a value may start with '-'
        source = flag(name)
    else:
        argv = []
        monkeypatch.setenv("HUB_" + name.upper(), value)
        source = "HUB_" + name.upper()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith(f"hubnode: error: {source}"), lines[0]
    assert "expected" in lines[0] or "not supported" in lines[0], lines[0]
    if name in SECRET_FIELDS and value.strip(", "):
        assert value not in lines[0]


@pytest.mark.parametrize(("url", "masked"), [
    ("redis://:s3cret-pw@h:6379/db0", "redis://:***@h:6379/db0"),
    ("redis://user:s3cret-pw@[::1", "redis://user:***@[::1"),  # too broken to parse: masked all the same
    ("unix:///tmp/r.sock?password=s3cret-pw&db=x", "unix:///tmp/r.sock?password=***&db=x"),
])
def test_redis_password_is_masked_in_the_error(url: str, masked: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--redis-url", url])
    err = capsys.readouterr().err
    assert "s3cret-pw" not in err and masked in err, err


def test_an_empty_variable_counts_as_unset() -> None:
    """`HUB_REDIS_URL=` in an .env file means no Redis, as it does for the publishers and hubctl."""
    cfg = parse_args([], {"HUB_REDIS_URL": "", "HUB_KEY_PREFIX": "", "HUB_PORT": ""})
    assert (cfg.redis_url, cfg.key_prefix, cfg.port) == (None, "hub:", 8080)


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--port"], ["extra"]])
def test_argparse_errors_are_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("hubnode: error:"), err


def test_settings_that_need_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--auth", "jwt"])
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--jwt-secret" in err


@pytest.mark.parametrize("content", [None, "not a key", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"])
def test_unreadable_jwt_public_key_is_refused_before_start(content: str | None, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The PEM file is read before the node starts, not on the first connection."""
    path = tmp_path / "key.pem"
    if content is not None:
        path.write_text(content)
    assert cli.main(["--auth", "jwt", "--jwt-public-key", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--jwt-public-key" in err


def test_good_values_still_parse() -> None:
    """The rules do not refuse what users write: 0 = unlimited/off, upper-case choices, IPv6, unix sockets."""
    cfg = parse_args(["--port", "0", "--host", "::1", "--log-level", "DEBUG", "--max-connections", "0",
                      "--ping-interval", "0", "--rate", "0", "--redis-url", "unix:///run/redis.sock?db=2&password=x",
                      "--allowed-origins", "http://localhost:3000,https://app.example.com,http://[::1]:8080,"
                      "capacitor://localhost,chrome-extension://abcdefghijklmnop"], {})
    assert (cfg.port, cfg.host, cfg.log_level, cfg.max_connections) == (0, "::1", "debug", 0)
    assert parse_args([], {"HUB_REDIS_URL": "rediss://user:pw@redis.internal:6380/1?ssl_cert_reqs=none"}).redis_url
    assert parse_args(["--client-private"], {}).client_private is True


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"port": 99999}, "--port"), ({"heartbeat": math.nan}, "--heartbeat"), ({"log_level": "loud"}, "--log-level"),
    ({"redis_url": "http://x"}, "--redis-url"), ({"api_key": ("a b",)}, "--api-key"),
    ({"allowed_origins": "*"}, "a tuple of strings"),
])
def test_python_callers_get_the_same_rules(kwargs: dict[str, object], fragment: str) -> None:
    """`Config(...)` in an application refuses what the command line refuses."""
    with pytest.raises(ConfigError, match=fragment):
        Config(**kwargs)  # type: ignore[arg-type]


def test_python_lists_are_taken_as_tuples() -> None:
    cfg = Config(allowed_origins=["https://app.example.com"], api_key=["k1"])  # type: ignore[arg-type]
    assert cfg.allowed_origins == ("https://app.example.com",) and cfg.api_key == ("k1",)


HUBCTL_BAD = [  # each of hubctl's options and arguments with a bad value; none reaches Redis
    (["--timeout", "-1", "stats"], "--timeout"),
    (["--timeout", "nan", "stats"], "--timeout"),
    (["stats", "--timeout", "soon"], "--timeout"),
    (["--key-prefix", "a b", "stats"], "--key-prefix"),
    (["--redis-url", "http://x", "stats"], "Redis URL"),
    (["--redis-url", "redis+sentinel://x", "rooms"], "Redis URL"),
    (["nope"], "COMMAND"),
    (["stats", "--bogus"], "--bogus"),
    (["publish", "--type", "t"], "--all --room --user"),
    (["publish", "--room", "a b", "--type", "t"], "room name"),
    (["publish", "--all", "--type", "ack"], "ack"),
    (["publish", "--all", "--type", "t", "--data", "{oops"], "--data"),
    (["members"], "ROOM"),
    (["members", "{x}"], "room name"),
]


@pytest.mark.parametrize(("argv", "fragment"), HUBCTL_BAD)
def test_hubctl_bad_input_is_one_line_and_exit_2(argv: list[str], fragment: str, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from publisher import cli as hubctl

    monkeypatch.setenv("HUB_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens: no case may get that far
    try:
        status = hubctl.main(argv)
    except SystemExit as exc:
        status = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("hubctl") and fragment in err, err


CLUSTER_BAD = [  # `make cluster CLUSTER_ARGS=...`: its own flags, and node flags after `--`
    (["--port", "99999"], "--port"), (["--redis-port", "-1"], "--redis-port"), (["--nodes", "0"], "--nodes"),
    (["--nodes", "x"], "--nodes"), (["--restart", "sometimes"], "--restart"),
    (["--", "--heartbeat", "nan"], "--heartbeat"), (["--", "--log-level", "loud"], "--log-level"),
    (["--", "--bogus"], "--bogus"),
    (["--redis", "swarm"], "--redis"), (["--redis", "cluster", "--redis-port", "55531"], "--redis-port"),
    (["--redis", "sentinel", "--redis-port", "45534"], "--redis-port"),
    (["--redis", "cluster", "--", "--redis-url", "redis://127.0.0.1:6379/0"], "--redis-url"),
    (["--", "--redis-url=redis://127.0.0.1:6379/0"], "--redis-url"),
]


@pytest.mark.parametrize(("argv", "fragment"), CLUSTER_BAD)
def test_cluster_script_refuses_bad_flags_before_starting_anything(argv: list[str], fragment: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A node flag is checked by the node's own rules first: a node refusing it would be restarted forever."""
    from deploy import cluster

    with pytest.raises(SystemExit) as exit_info:
        cluster.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and fragment in err, err


@pytest.mark.parametrize(("argv", "redis", "port"), [
    ([], "single", 6380), (["--redis", "cluster"], "cluster", 7001), (["--redis", "sentinel"], "sentinel", 6380),
    (["--redis", "cluster", "--redis-port", "0"], "cluster", 0),
    (["--redis", "cluster", "--redis-port", "55530"], "cluster", 55530),  # the highest: bus ports end at 65535
    (["--redis", "sentinel", "--redis-port", "45533"], "sentinel", 45533),  # sentinels end at 65535
])
def test_cluster_script_redis_modes_have_fixed_default_ports(argv: list[str], redis: str, port: int) -> None:
    """--redis picks the topology; --redis-port defaults to its first fixed port, so the printed URL is stable."""
    from deploy import cluster

    args, _ = cluster.parse_args(argv)
    assert (args.redis, args.redis_port) == (redis, port)


def test_no_compression_flag_and_compress_min_bytes() -> None:
    """permessage-deflate is on by default; --no-compression and HUB_COMPRESSION=off turn it off."""
    assert parse_args([]).compression is True
    assert parse_args(["--no-compression"]).compression is False
    assert parse_args([], env={"HUB_COMPRESSION": "off"}).compression is False
    assert parse_args(["--compress-min-bytes", "0"]).compress_min_bytes == 0
