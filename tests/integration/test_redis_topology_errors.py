"""A Redis topology that is wrong rather than down is refused in one line (docs/redis.md).

The real console scripts run as subprocesses, with a timeout (a node that
wrongly starts serving fails the test by it): `hubnode` exits 2 with one
`hubnode: error: --redis-url '…': …` line and no traceback. `hubctl` is run
on the same inputs, since it asks the servers what they are first, as the
node does: one `hubctl: error:` line, exit 2 for the same mistakes, and
exit 1 where nothing answers at all ("cannot reach").
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from deploy.redis_servers import RedisClusterProcs, SentinelProcs, free_port, free_ports, key_slot
from tests.helpers import RedisServer
from tests.integration.test_redis_tls import assert_one_line_error, run


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelProcs]:
    """A Sentinel setup (master name `hubmaster`) that these tests only ask questions of."""
    with SentinelProcs(tmp_path_factory.mktemp("sentinel-errors")) as found:
        yield found


def hubnode(url: str) -> subprocess.CompletedProcess[str]:
    """`hubnode --redis-url URL` on a free port, to its end."""
    return run("hubnode", "--host", "127.0.0.1", "--port", str(free_port()), "--redis-url", url)


def test_wrong_master_name_is_refused(sentinels: SentinelProcs) -> None:
    """Sentinels that know no primary of that name: hubnode and hubctl exit 2 naming the name, in one line."""
    url = sentinels.url.replace(f"/{sentinels.master_name}", "/nosuchmaster")
    done = hubnode(url)
    assert_one_line_error(done, "hubnode", 2, f"--redis-url '{url}':",
                          "knows a primary named 'nosuchmaster'")
    assert_one_line_error(run("hubctl", "--redis-url", url, "stats"), "hubctl", 2,
                          "knows a primary named 'nosuchmaster'")


def test_plain_url_to_a_sentinel_port_is_refused(sentinels: SentinelProcs) -> None:
    """`redis://` of a Sentinel's port: hubnode and hubctl both exit 2, saying to use redis+sentinel://."""
    address = sentinels.sentinels[0].address
    url = f"redis://{address}"
    says = f"{address} is a Redis Sentinel: use redis+sentinel://{address}/<master name>"
    done = hubnode(url)
    assert_one_line_error(done, "hubnode", 2, f"--redis-url '{url}':", says)
    assert_one_line_error(run("hubctl", "--redis-url", url, "rooms"), "hubctl", 2, says)


def test_unreachable_cluster_seeds_are_refused() -> None:
    """redis+cluster:// whose seeds are all closed ports: hubnode exits 2 (no Redis answered at either
    seed); hubctl exits 1, saying the same: nothing answered."""
    first, second = free_ports(2)
    url = f"redis+cluster://127.0.0.1:{first},127.0.0.1:{second}"
    done = hubnode(url)
    assert_one_line_error(done, "hubnode", 2, f"--redis-url '{url}':", "no Redis answered at",
                          f"127.0.0.1:{first}", f"127.0.0.1:{second}")
    assert_one_line_error(run("hubctl", "--redis-url", url, "stats"), "hubctl", 1,
                          f"cannot reach Redis at {url}", "no Redis answered at", f"127.0.0.1:{first}")


def test_unreachable_sentinels_are_refused() -> None:
    """redis+sentinel:// whose sentinels are all closed ports: hubnode exits 2 (no Sentinel answered);
    hubctl exits 1, saying the same: nothing answered."""
    first, second = free_ports(2)
    url = f"redis+sentinel://127.0.0.1:{first},127.0.0.1:{second}/hubmaster"
    done = hubnode(url)
    assert_one_line_error(done, "hubnode", 2, f"--redis-url '{url}':",
                          f"no Sentinel answered at 127.0.0.1:{first}, 127.0.0.1:{second}")
    assert_one_line_error(run("hubctl", "--redis-url", url, "stats"), "hubctl", 1,
                          f"cannot reach Redis at {url}", f"no Sentinel answered at 127.0.0.1:{first}")


def test_cluster_with_an_uncovered_slot_is_refused(own_redis_cluster: RedisClusterProcs) -> None:
    """A cluster with one slot owned by nobody (cluster_state:fail), by redis+cluster:// or by a plain seed:
    hubnode and hubctl exit 2 with `16383 of 16384 slots are assigned`."""
    own_redis_cluster.uncover_slot(key_slot(b"anything"))
    says = "is not usable: 16383 of 16384 slots are assigned and cluster_state is fail"
    for url in (own_redis_cluster.url, own_redis_cluster.seed_url):
        done = hubnode(url)
        assert_one_line_error(done, "hubnode", 2, f"--redis-url '{url}':", says)
    for url in (own_redis_cluster.url, own_redis_cluster.seed_url):
        assert_one_line_error(run("hubctl", "--redis-url", url, "stats"), "hubctl", 2, says)


def test_cluster_url_to_a_plain_redis_is_refused(redis_server: RedisServer) -> None:
    """redis+cluster:// of a Redis that is not in cluster mode: hubnode exits 2 saying to use redis://;
    hubctl says the same, exit 2."""
    address = f"127.0.0.1:{redis_server.port}"
    url = f"redis+cluster://{address}"
    done = hubnode(url)
    assert_one_line_error(done, "hubnode", 2, f"--redis-url '{url}':",
                          f"{address} is not in cluster mode: use redis://{address} for one Redis")
    assert_one_line_error(run("hubctl", "--redis-url", url, "stats"), "hubctl", 2,
                          f"{address} is not in cluster mode: use redis://{address} for one Redis")
