"""Rate-limit arithmetic, the error streak, origin rules and configuration parsing."""

from __future__ import annotations

import pytest

from hubnode.config import Config, ConfigError, parse_args
from hubnode.policy import ErrorStreak, TokenBucket, origin_allowed


def test_token_bucket_burst_then_refill() -> None:
    """A full bucket allows `burst` frames at once, then `rate` per second."""
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.05) is False  # half a token
    assert bucket.take(0.1) is True
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_token_bucket_rate_zero_is_off() -> None:
    """rate 0 disables the limit."""
    bucket = TokenBucket(rate=0, burst=1)
    assert all(bucket.take(0.0) for _ in range(1000))


def test_error_streak() -> None:
    """More than `limit` errors in a row trip it; a success resets it."""
    streak = ErrorStreak(limit=2)
    assert [streak.error(), streak.error()] == [False, False]
    streak.ok()
    assert [streak.error(), streak.error(), streak.error()] == [False, False, True]


@pytest.mark.parametrize(("origin", "allowed", "local", "ok"), [
    (None, None, False, True),
    ("http://localhost:3000", None, True, True),
    ("http://127.0.0.1", None, True, True),
    ("http://[::1]:8080", None, True, True),
    ("http://evil.example", None, True, False),
    ("http://localhost:3000", None, False, False),
    ("https://app.example", ("https://app.example",), False, True),
    ("https://other.example", ("https://app.example",), True, False),
    ("https://any.example", ("*",), False, True),
    ("null", None, True, False),
])
def test_origin_rules(origin: str | None, allowed: tuple[str, ...] | None, local: bool, ok: bool) -> None:
    """docs/protocol.md: no Origin passes, lists are exact, localhost only by default."""
    assert origin_allowed(origin, allowed, local) is ok


def test_flags_and_environment() -> None:
    """Flags win over HUB_* variables; booleans and lists parse."""
    cfg = parse_args(["--port", "9000", "--api-key", "a,b"],
                     {"HUB_PORT": "1", "HUB_ALLOW_ANONYMOUS": "yes", "HUB_KEY_PREFIX": "x:"})
    assert cfg.port == 9000 and cfg.allow_anonymous is True and cfg.key_prefix == "x:"
    assert cfg.api_key == ("a", "b")
    assert parse_args(["--client-broadcast", "off"], {}).client_broadcast is False


def test_defaults_match_protocol() -> None:
    """Defaults of docs/protocol.md."""
    cfg = Config()
    assert (cfg.max_message_bytes, cfg.max_outbound_bytes, cfg.max_rooms_per_conn) == (65536, 4 << 20, 100)
    assert (cfg.rate, cfg.burst, cfg.heartbeat, cfg.drain_timeout) == (50, 100, 2.0, 10.0)
    assert cfg.key_prefix == "hub:" and cfg.host == "127.0.0.1" and cfg.port == 8080


def test_non_loopback_anonymous_refused() -> None:
    """auth none on a public address needs --allow-anonymous."""
    with pytest.raises(ConfigError):
        Config(host="0.0.0.0").check_exposure()
    Config(host="0.0.0.0", allow_anonymous=True).check_exposure()
    Config(host="::1").check_exposure()


def test_cluster_and_sentinel_urls_name_their_topology() -> None:
    """redis+cluster:// and redis+sentinel:// are accepted and read as docs/redis.md says."""
    cluster = Config(redis_url="redis+cluster://h1:7001,h2:7002").redis_target()
    assert (cluster.kind, cluster.hosts, cluster.sharded) == ("cluster", (("h1", 7001), ("h2", 7002)), True)
    sentinel = Config(redis_url="redis+sentinel://:pw@s1:26379,s2:26380/hubmaster/2").redis_target()
    assert (sentinel.kind, sentinel.master, sentinel.db, sentinel.password) == ("sentinel", "hubmaster", 2, "pw")
    tls = Config(redis_url="rediss://h:6380/0", redis_ca="/ca.pem").redis_target()
    assert (tls.kind, tls.tls, tls.ca) == ("single", True, "/ca.pem")
    with pytest.raises(ConfigError, match="need a TLS URL"):
        Config(redis_url="redis://h:6379/0", redis_ca="/ca.pem")
    with pytest.raises(ConfigError, match="need --redis-url"):
        Config(redis_cert="/c.pem")


def test_bad_env_value_exits() -> None:
    """A malformed HUB_* value is a usage error, not a traceback."""
    with pytest.raises(SystemExit):
        parse_args([], {"HUB_PORT": "eighty"})
