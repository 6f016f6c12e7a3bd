"""Server-side control (docs/protocol.md) across real nodes sharing one Redis: disconnect, join and
leave a user's connections (or one connection) from the HTTP API, the publisher and hubctl.

Absence is proven without waiting: after a probe published to a room, a marker published to the user
follows on the same subscriber connection, so a connection that is not a member sees the marker first.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import jwt
import pytest

from publisher import Publisher
from tests.helpers import ROOT, Client, Cluster, NodeProcess, RedisServer, deadline, wait_until

PREFIX = f"ctl{os.getpid()}:"
KEY = "ctl-api-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_ROOMS = 3
SECRET = "s3cret-for-tests-that-is-32-bytes-long"


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    """Three nodes for the whole module, with an API key and a small room limit; tests use distinct users."""
    c = Cluster(redis_server.url, PREFIX, n=3,
                extra=("--api-key", KEY, "--max-rooms-per-conn", str(MAX_ROOMS))).start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def pub(redis_server: RedisServer) -> Iterator[Publisher]:
    with Publisher(redis_server.url, key_prefix=PREFIX) as p:
        yield p


async def connect(session: aiohttp.ClientSession, node: NodeProcess, user: str | None = None) -> Client:
    return await Client.open(session, node.ws_url + (f"?user_id={user}" if user else ""))


async def call(session: aiohttp.ClientSession, node: NodeProcess, method: str, path: str,
               body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, JSON body) of one HTTP request; `body` is sent as JSON unless None."""
    kw: dict[str, Any] = {"headers": AUTH if headers is None else headers}
    if body is not None:
        kw["json"] = body
    async with session.request(method, f"{node.url}{path}", **kw) as resp:
        text = await resp.text()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


async def hubctl(cluster: Cluster, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `hubctl --redis-url … --key-prefix … ARGS`."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "publisher.cli", "--redis-url", cluster.redis_url, "--key-prefix", cluster.prefix,
        *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def next_of(client: Client, *types: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame of one of `types`, skipping the others (acks of earlier requests)."""
    end = deadline(timeout)
    while True:
        frame = await client.recv(max(0.01, end - time.monotonic()))
        if frame["type"] in types:
            return frame


async def system(client: Client) -> dict[str, Any]:
    """The data of the client's very next frame, which must be a system message."""
    frame = await client.recv()
    assert frame["type"] == "system_message" and isinstance(frame.get("timestamp"), int), frame
    return frame["data"]  # type: ignore[no-any-return]


async def membership(pub: Publisher, room: str, user: str, members: list[Client], others: list[Client],
                     token: str) -> None:
    """Members of `room` get a probe published to it, then a marker published to `user`; the user's other
    connections see the marker first (and no system message in between)."""
    pub.broadcast_to_room(room, {"type": "probe", "data": token})
    pub.broadcast_to_user(user, {"type": "marker", "data": token})
    for client in members:
        frame = await next_of(client, "probe", "marker", "system_message")
        assert frame == {**frame, "type": "probe", "data": token, "room": room}, frame
        frame = await next_of(client, "probe", "marker", "system_message")
        assert frame["type"] == "marker" and frame["data"] == token, frame
    for client in others:
        frame = await next_of(client, "probe", "marker", "system_message")
        assert frame["type"] == "marker" and frame["data"] == token, frame


class _AnyInt:
    """Equal to any int: a timestamp in an expected frame."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, int)

    def __repr__(self) -> str:
        return "<any int>"


ANY_INT: Any = _AnyInt()


def is_error(body: Any) -> bool:
    """Whether `body` is the HTTP API's error shape `{"ok": false, "error": {"code": C, "message": M}}`."""
    return (isinstance(body, dict) and body.get("ok") is False and isinstance(body.get("error"), dict)
            and isinstance(body["error"].get("code"), str) and isinstance(body["error"].get("message"), str))


def disconnect_data(reason: str, reconnect: bool) -> dict[str, Any]:
    return {"event": "disconnect", "reason": reason, "reconnect": reconnect}


# -- disconnect ---------------------------------------------------------------------------

@pytest.mark.parametrize(("reconnect", "code"), [(False, 4000), (True, 4001)])
async def test_disconnect_user_from_a_worker_closes_every_connection(
        cluster: Cluster, pub: Publisher, session: aiohttp.ClientSession, reconnect: bool, code: int) -> None:
    """Publisher.disconnect_user on a user with connections on 3 nodes returns 3; each connection gets the
    disconnect system message first, then close 4000 (reconnect False) or 4001 (reconnect True)."""
    user = f"dc-{code}"
    tabs = [await connect(session, node, user) for node in cluster.nodes]
    assert pub.disconnect_user(user, reason="kicked", reconnect=reconnect) == 3
    for tab in tabs:
        assert await system(tab) == disconnect_data("kicked", reconnect)
        assert await tab.closed_with() == code


async def test_disconnect_one_connection_by_id(cluster: Cluster, pub: Publisher,
                                               session: aiohttp.ClientSession) -> None:
    """POST /api/connections/<id>/disconnect (on another node) and Publisher.disconnect_connection close only
    that connection, answering 1 node; the user's other connections, on its node and another, stay."""
    n1, n2, n3 = cluster.nodes
    user = "dcc-alice"
    other, target, sibling = await connect(session, n1, user), await connect(session, n2, user), \
        await connect(session, n2, user)
    status, body = await call(session, n3, "POST", f"/api/connections/{target.conn_id}/disconnect",
                              {"reason": "one", "reconnect": True})
    assert (status, body) == (200, {"ok": True, "nodes": 1})
    assert await system(target) == disconnect_data("one", True)
    assert await target.closed_with() == 4001
    assert pub.broadcast_to_user(user, {"type": "still", "data": 1}) == 2
    for client in (other, sibling):
        assert (await next_of(client, "still", "system_message"))["type"] == "still"

    assert pub.disconnect_connection(sibling.conn_id, reason="two") == 1
    assert await system(sibling) == disconnect_data("two", False)
    assert await sibling.closed_with() == 4000
    pub.broadcast_to_user(user, {"type": "still", "data": 2})
    frame = await next_of(other, "still", "system_message")
    assert frame["type"] == "still" and frame["data"] == 2, frame


async def test_hubctl_disconnect_with_reason_and_reconnect(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """`hubctl disconnect USER --reason R --reconnect` answers 2 nodes and closes each of the user's connections
    (on 2 nodes) with 4001 after the disconnect system message carrying R."""
    user = "hd-alice"
    tabs = [await connect(session, cluster.nodes[0], user), await connect(session, cluster.nodes[2], user)]
    status, out, err = await hubctl(cluster, "disconnect", user, "--reason", "maintenance", "--reconnect", "--json")
    assert status == 0, err
    assert json.loads(out) == {"op": "disconnect", "user": user, "nodes": 2}
    for tab in tabs:
        assert await system(tab) == disconnect_data("maintenance", True)
        assert await tab.closed_with() == 4001


# -- join and leave -----------------------------------------------------------------------

async def test_hubctl_join_and_leave_a_users_tabs(cluster: Cluster, pub: Publisher,
                                                  session: aiohttp.ClientSession) -> None:
    """`hubctl join` (2 nodes took it) makes a user's 2 tabs (2 nodes) members: each gets `joined`, then messages
    published to the room; `hubctl leave`: each gets `left` and no longer the room's messages."""
    n1, n2, _ = cluster.nodes
    user, room = "hj-alice", "hj-room"
    tabs = [await connect(session, n1, user), await connect(session, n2, user)]
    status, out, err = await hubctl(cluster, "join", user, room, "--json")
    assert status == 0, err
    assert json.loads(out) == {"op": "join", "user": user, "room": room, "nodes": 2}
    for tab in tabs:
        assert await system(tab) == {"event": "joined", "room": room}
    await membership(pub, room, user, tabs, [], "in")
    await wait_until(lambda: pub.presence(room).users == {user: 2}, what="both tabs in the room's presence")

    status, out, err = await hubctl(cluster, "leave", user, room, "--json")
    assert status == 0, err
    assert json.loads(out) == {"op": "leave", "user": user, "room": room, "nodes": 2}
    for tab in tabs:
        assert await system(tab) == {"event": "left", "room": room}
    await membership(pub, room, user, [], tabs, "out")
    await wait_until(lambda: pub.presence(room).users == {}, what="the leave to reach Redis")


async def test_joined_comes_once_the_join_is_routable(cluster: Cluster, pub: Publisher,
                                                     session: aiohttp.ClientSession) -> None:
    """A message published to the room as soon as `joined` arrives reaches the connection (100 rooms, each new)."""
    user = "rj-alice"
    client = await connect(session, cluster.nodes[1], user)
    for n in range(100):
        room = f"rj-{n}"
        assert pub.join_user(user, room) == 1
        assert await system(client) == {"event": "joined", "room": room}
        assert pub.broadcast_to_room(room, {"type": "probe", "data": n}) == 1
        assert (await client.recv()) == {"type": "probe", "data": n, "room": room, "timestamp": ANY_INT}
        assert pub.leave_user(user, room) == 1  # under --max-rooms-per-conn
        assert await system(client) == {"event": "left", "room": room}


async def test_connections_opened_after_a_command_are_not_affected(cluster: Cluster, pub: Publisher,
                                                                   session: aiohttp.ClientSession) -> None:
    """A connection opened after a join is not a member of the room; one opened after a disconnect stays open."""
    n1, n2, _ = cluster.nodes
    user, room = "late-alice", "late-room"
    early = await connect(session, n1, user)
    assert pub.join_user(user, room) == 1
    assert await system(early) == {"event": "joined", "room": room}
    late = await connect(session, n2, user)
    await membership(pub, room, user, [early], [late], "after-join")

    user = "late-bob"
    early = await connect(session, n1, user)
    assert pub.disconnect_user(user) == 1
    assert (await system(early))["event"] == "disconnect"
    assert await early.closed_with() == 4000
    late = await connect(session, n2, user)
    pub.broadcast_to_user(user, {"type": "marker", "data": "after-disconnect"})
    frame = await next_of(late, "marker", "system_message")
    assert frame["type"] == "marker", frame
    assert (await late.request("ping", "alive", "p"))["type"] == "pong"


async def test_a_server_side_join_beyond_the_room_limit_is_refused_for_that_connection(
        cluster: Cluster, pub: Publisher, session: aiohttp.ClientSession) -> None:
    """A server-side join of a user whose one connection is at --max-rooms-per-conn: that connection gets a
    too_many_rooms error naming the room and is not joined; the user's other connection is joined."""
    n1, n2, _ = cluster.nodes
    user, room = "mr-alice", "mr-extra"
    full = await connect(session, n1, user)
    for n in range(MAX_ROOMS):
        await full.join(f"mr-{n}", fid=n)
    roomy = await connect(session, n2, user)
    assert pub.join_user(user, room) == 2
    error = await next_of(full, "error", "system_message")
    assert error["type"] == "error" and error["data"]["code"] == "too_many_rooms", error
    assert error["data"]["room"] == room and isinstance(error["data"]["message"], str), error
    assert await system(roomy) == {"event": "joined", "room": room}
    await membership(pub, room, user, [roomy], [full], "limit")
    await wait_until(lambda: pub.presence(room).users == {user: 1}, what="one connection in the room's presence")


async def test_a_server_side_join_ignores_the_tokens_rooms_claim(cluster: Cluster, pub: Publisher,
                                                                 session: aiohttp.ClientSession) -> None:
    """On a jwt node a user whose token's rooms claim forbids a room is joined to it by a server-side join."""
    args = list(cluster.nodes[0].args)
    args[args.index("--node-id") + 1] = "j1"
    node = NodeProcess(*args, "--auth", "jwt", "--jwt-secret", SECRET).start()
    try:
        user, room = "jw-alice", "jw-other"
        token = jwt.encode({"sub": user, "exp": int(time.time()) + 300, "rooms": ["jw-allowed-*"]}, SECRET,
                           algorithm="HS256")
        client = await Client.open(session, f"{node.ws_url}?token={token}")
        reply = await client.request("join_room", room, "j")
        assert reply["type"] == "error" and reply["data"]["code"] == "forbidden", reply  # the claim is in force
        assert pub.join_user(user, room) == 1
        assert await system(client) == {"event": "joined", "room": room}
        await membership(pub, room, user, [client], [], "claim")
    finally:
        node.stop()


# -- routing, metrics, unknown users --------------------------------------------------------

async def control_counts(session: aiohttp.ClientSession, node: NodeProcess) -> dict[str, int]:
    """The node's `control` counters from /api/metrics (absent ones are 0)."""
    status, body = await call(session, node, "GET", "/api/metrics")
    assert status == 200, body
    return {op: int(body.get("control", {}).get(op, 0)) for op in ("disconnect", "join", "leave")}


async def prometheus_counts(session: aiohttp.ClientSession, node: NodeProcess) -> dict[str, float]:
    """hubnode_control_commands_total by op from /metrics (absent ones are 0)."""
    async with session.get(f"{node.url}/metrics", headers=AUTH) as resp:
        assert resp.status == 200
        text = await resp.text()
    counts = dict.fromkeys(("disconnect", "join", "leave"), 0.0)
    for line in text.splitlines():
        sample = re.match(r"hubnode_control_commands_total\{(.*)\} (\S+)$", line)
        if sample:
            op = re.search(r'op="([^"]*)"', sample[1])
            assert op is not None, line
            counts[op[1]] = float(sample[2])
    return counts


async def test_a_command_reaches_only_the_nodes_holding_its_target(cluster: Cluster, pub: Publisher,
                                                                    session: aiohttp.ClientSession) -> None:
    """A join, a leave and a disconnect of a user held by one node are taken by that node only (1 node
    answered); its `control` metric (JSON and Prometheus) counts each, the other nodes' do not change."""
    a, b, c = cluster.nodes
    before = [await control_counts(session, node) for node in cluster.nodes]
    prom_before = await prometheus_counts(session, c), await prometheus_counts(session, a)
    carol = await connect(session, c, "rt-carol")
    assert pub.join_user("rt-carol", "rt-room") == 1
    assert await system(carol) == {"event": "joined", "room": "rt-room"}
    assert pub.leave_user("rt-carol", "rt-room") == 1
    assert await system(carol) == {"event": "left", "room": "rt-room"}
    alice = await connect(session, a, "rt-alice")
    status, body = await call(session, b, "POST", "/api/users/rt-alice/disconnect", {})  # both fields optional
    assert (status, body) == (200, {"ok": True, "nodes": 1})
    data = await system(alice)
    assert data["event"] == "disconnect" and data["reconnect"] is False, data
    assert await alice.closed_with() == 4000

    want = [dict(before[0], disconnect=before[0]["disconnect"] + 1), before[1],
            dict(before[2], join=before[2]["join"] + 1, leave=before[2]["leave"] + 1)]

    async def counted() -> bool:
        return [await control_counts(session, node) for node in cluster.nodes] == want

    await wait_until(counted, what=f"control metrics {want}")
    prom_c, prom_a = await prometheus_counts(session, c), await prometheus_counts(session, a)
    assert prom_c == dict(prom_before[0], join=prom_before[0]["join"] + 1, leave=prom_before[0]["leave"] + 1)
    assert prom_a == dict(prom_before[1], disconnect=prom_before[1]["disconnect"] + 1)


async def test_an_unknown_user_answers_zero_nodes(cluster: Cluster, pub: Publisher,
                                                  session: aiohttp.ClientSession) -> None:
    """Commands for a user nobody holds (or a connection of a node that does not exist) answer 0 nodes over
    HTTP and from Publisher."""
    node = cluster.nodes[1]
    for method, path, body in (("POST", "/api/users/nobody-here/disconnect", {"reason": "x"}),
                               ("PUT", "/api/users/nobody-here/rooms/nh-room", None),
                               ("DELETE", "/api/users/nobody-here/rooms/nh-room", None),
                               ("POST", "/api/connections/no-such-node:1/disconnect", {})):
        assert await call(session, node, method, path, body) == (200, {"ok": True, "nodes": 0}), (method, path)
    assert pub.disconnect_user("nobody-here", reason="x") == 0
    assert pub.join_user("nobody-here", "nh-room") == 0
    assert pub.leave_user("nobody-here", "nh-room") == 0
    assert pub.disconnect_connection("no-such-node:1") == 0


# -- authorization and bad input -----------------------------------------------------------

async def test_http_control_needs_the_api_key(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """With --api-key, the control routes (and presence) answer 401 without the key or with a wrong one, and do
    nothing; with the key, PUT joins, DELETE leaves and POST disconnects (200, 1 node)."""
    n1, n2, _ = cluster.nodes
    user = "key-alice"
    client = await connect(session, n1, user)
    routes = [("POST", f"/api/users/{user}/disconnect", {}), ("PUT", f"/api/users/{user}/rooms/key-x", None),
              ("DELETE", f"/api/users/{user}/rooms/key-x", None),
              ("POST", f"/api/connections/{client.conn_id}/disconnect", {}),
              ("GET", "/api/rooms/key-x/presence", None)]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, path, body in routes:
            status, _ = await call(session, n2, method, path, body, headers)
            assert status == 401, (method, path, headers, status)

    # the commands travel on the user's channel in order: had a refused one been sent, it would come first
    assert await call(session, n2, "PUT", f"/api/users/{user}/rooms/key-room") == (200, {"ok": True, "nodes": 1})
    assert await system(client) == {"event": "joined", "room": "key-room"}
    assert await call(session, n2, "DELETE", f"/api/users/{user}/rooms/key-room") == (200, {"ok": True, "nodes": 1})
    assert await system(client) == {"event": "left", "room": "key-room"}
    status, body = await call(session, n2, "POST", f"/api/users/{user}/disconnect", {"reason": "with key"})
    assert (status, body) == (200, {"ok": True, "nodes": 1})
    assert await system(client) == disconnect_data("with key", False)
    assert await client.closed_with() == 4000


async def test_bad_input_is_refused_and_does_nothing(cluster: Cluster, session: aiohttp.ClientSession) -> None:
    """Invalid user ids, room names and connection ids are 400; a disconnect body with a reason that is not a
    string or a reconnect that is not a boolean is 400; text/plain is 415. None of them reaches the user."""
    n1, n2, _ = cluster.nodes
    user = "bi-alice"
    client = await connect(session, n1, user)
    long_user, long_room = "u" * 129, "r" * 129
    bad = [("POST", "/api/users/a%20b/disconnect", {}), ("POST", f"/api/users/{long_user}/disconnect", {}),
           ("POST", "/api/users/a%7Bb%7D/disconnect", {}), ("PUT", "/api/users/a%20b/rooms/bi-room", None),
           ("DELETE", "/api/users/a%7Bb%7D/rooms/bi-room", None),
           ("PUT", f"/api/users/{user}/rooms/bad%20room", None), ("PUT", f"/api/users/{user}/rooms/{long_room}", None),
           ("DELETE", f"/api/users/{user}/rooms/bad%7Broom%7D", None),
           ("POST", "/api/connections/no-colon/disconnect", {}),
           ("POST", f"/api/users/{user}/disconnect", {"reason": 5}),
           ("POST", f"/api/users/{user}/disconnect", {"reason": "x", "reconnect": "yes"}),
           ("POST", f"/api/connections/{client.conn_id}/disconnect", {"reason": ["x"]})]
    wrong = []  # every refusal checked before failing, so one run names every case that is wrong
    for method, path, body in bad:
        status, answer = await call(session, n2, method, path, body)
        if status != 400 or not is_error(answer):
            wrong.append((method, path, body, status, answer))
    for path in (f"/api/users/{user}/disconnect", f"/api/connections/{client.conn_id}/disconnect"):
        async with session.post(f"{n2.url}{path}", data='{"reason": "x"}',
                                headers={**AUTH, "Content-Type": "text/plain"}) as resp:
            if resp.status != 415:
                wrong.append(("POST text/plain", path, None, resp.status, await resp.text()))

    # commands on the user's channel arrive in order: had a refused one been sent, it would come first
    assert await call(session, n2, "PUT", f"/api/users/{user}/rooms/bi-room") == (200, {"ok": True, "nodes": 1})
    assert await system(client) == {"event": "joined", "room": "bi-room"}
    assert not wrong, wrong
