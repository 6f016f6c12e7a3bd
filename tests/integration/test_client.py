"""hubnode.client against real node processes: acks, errors and timeouts, reconnects to another URL
after kill -9 with rejoin and recovery without a gap, 4000 stops and 4001 reconnects, server-side
joins and member lists, msgpack, and servers that send what no hub sends.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from hubnode.client import (
    BadServerFrame,
    ClientClosed,
    Disconnected,
    HandshakeRefused,
    HubClient,
    RequestFailed,
    RequestTimeout,
)
from publisher import Publisher
from tests.helpers import SCALE, Cluster, NodeProcess, RedisServer, start_all, wait_until

Frame = dict[str, Any]


@pytest.fixture(scope="module")
def node(redis_server: RedisServer) -> Iterator[tuple[NodeProcess, Publisher]]:
    """One real node with history and presence everywhere, and a Publisher on its Redis."""
    prefix = "client-tests:"
    proc = NodeProcess("--redis-url", redis_server.url, "--key-prefix", prefix, "--history-size", "50",
                       "--presence-rooms", "*", "--rate", "0", "--heartbeat", "0.5").start()
    publisher = Publisher(redis_server.url, key_prefix=prefix)
    yield proc, publisher
    publisher.close()
    proc.stop()


@pytest.fixture
async def clients() -> AsyncIterator[list[HubClient]]:
    """Clients a test makes; all closed at its end, whatever happened."""
    made: list[HubClient] = []
    yield made
    for client in made:
        await client.close()


def make(made: list[HubClient], url: str | list[str], **options: Any) -> HubClient:
    client = HubClient(url, timeout=5 * SCALE, **options)
    made.append(client)
    return client


async def next_of(client: HubClient, *types: str, timeout: float = 10) -> Frame:
    """The next frame of one of `types` that iteration yields (others are skipped)."""
    async def find() -> Frame:
        async for frame in client:
            if frame["type"] in types:
                return frame
        raise AssertionError(f"the client stopped before a frame of {types}")
    return await asyncio.wait_for(find(), timeout * SCALE)


async def test_requests_return_their_answer_and_errors_raise_with_the_protocol_code(
        node: tuple[NodeProcess, Publisher], clients: list[HubClient]) -> None:
    proc, _ = node
    alice = await make(clients, proc.ws_url, user_id="alice").connect()
    assert alice.connected and alice.info and alice.info["user_id"] == "alice"
    ack = await alice.join("acks")
    assert ack["type"] == "ack" and ack["data"]["offset"] == 0 and isinstance(ack["data"]["epoch"], str)
    assert (await alice.send_to_room("acks", "hi"))["type"] == "ack"
    assert (await alice.ping({"n": 1}))["data"] == {"n": 1}
    assert await alice.presence("acks") == {"users": {"alice": 1}, "anonymous": 0}
    with pytest.raises(RequestFailed) as refused:
        await alice.send_to_room("elsewhere", "x")
    assert refused.value.code == "not_in_room"
    with pytest.raises(RequestFailed) as bad:
        await alice.join("no spaces allowed")
    assert bad.value.code == "bad_room" and "no spaces allowed" not in alice.rooms
    assert alice.rooms == {"acks"}
    assert alice.position("acks") is not None and alice.position("acks").offset == 1  # its own message came back


async def test_async_for_yields_messages_in_order_with_their_positions(
        node: tuple[NodeProcess, Publisher], clients: list[HubClient]) -> None:
    proc, publisher = node
    bob = await make(clients, proc.ws_url, user_id="bob").connect()
    await bob.join("news")
    for n in range(3):
        publisher.broadcast_to_room("news", {"type": "headline", "data": n})
    got = [await next_of(bob, "headline") for _ in range(3)]
    assert [m["data"] for m in got] == [0, 1, 2]
    assert [m["offset"] for m in got] == [1, 2, 3] and bob.position("news").offset == 3


async def test_a_request_without_answer_times_out(redis_server: RedisServer, clients: list[HubClient]) -> None:
    """A node stopped with SIGSTOP answers nothing: RequestTimeout after the request's timeout, not before."""
    proc = NodeProcess("--rate", "0").start()
    try:
        carol = await make(clients, proc.ws_url, user_id="carol", heartbeat=None).connect()
        proc.signal(signal.SIGSTOP)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(RequestTimeout):
            await carol.ping("anyone?", timeout=0.5)
        assert loop.time() - started >= 0.5
        proc.signal(signal.SIGCONT)
        assert (await carol.ping("back"))["data"] == "back"
    finally:
        proc.signal(signal.SIGCONT)
        proc.stop()


async def test_kill_9_reconnects_to_the_next_url_rejoins_and_recovers_without_a_gap(
        redis_server: RedisServer, prefix: str, clients: list[HubClient]) -> None:
    """Messages published while the client's node is dead reach it once each, in order, from the other node."""
    cluster = Cluster(redis_server.url, prefix, n=2, extra=("--history-size", "50")).start()
    publisher = Publisher(redis_server.url, key_prefix=prefix)
    try:
        a, b = cluster.nodes
        dave = make(clients, [a.ws_url, b.ws_url], user_id="dave", min_delay=1.0)
        await dave.connect()
        assert dave.node == "n1"
        await dave.join("ops")
        publisher.broadcast_to_room("ops", {"type": "tick", "data": 0})
        assert (await next_of(dave, "tick"))["data"] == 0
        assert a.proc is not None
        a.proc.kill()
        gone = await next_of(dave, "disconnected")
        assert gone["code"] == 1006 and gone["delay"] >= 0.5  # backoff: at least half of min_delay
        # The client waits out its backoff: these are published while it has no connection.
        for n in range(1, 6):
            publisher.broadcast_to_room("ops", {"type": "tick", "data": n})
        for n in range(3):
            publisher.broadcast_to_user("dave", {"type": "direct", "data": n})
        assert (await next_of(dave, "connected"))["data"]["node"] == "n2"
        frames = [await next_of(dave, "tick", "direct", "recovered") for _ in range(10)]
        ticks = [f["data"] for f in frames if f["type"] == "tick"]
        directs = [f["data"] for f in frames if f["type"] == "direct"]
        recovered = {(f["stream"], f["room"]): f["recovered"] for f in frames if f["type"] == "recovered"}
        assert ticks == [1, 2, 3, 4, 5] and directs == [0, 1, 2]
        assert recovered == {("user", None): True, ("room", "ops"): True}
        publisher.broadcast_to_room("ops", {"type": "tick", "data": 6})  # re-joined: live messages flow
        assert (await next_of(dave, "tick"))["data"] == 6
        assert dave.rooms == {"ops"} and dave.position("ops").offset == 7
    finally:
        publisher.close()
        cluster.stop()


async def test_close_4000_stops_the_client(node: tuple[NodeProcess, Publisher], clients: list[HubClient]) -> None:
    proc, publisher = node
    erin = await make(clients, proc.ws_url, user_id="erin").connect()
    await erin.join("lobby")
    assert publisher.disconnect_user("erin", reason="account closed") == 1
    farewell = await next_of(erin, "system_message")
    assert farewell["data"] == {"event": "disconnect", "reason": "account closed", "reconnect": False}
    gone = await next_of(erin, "disconnected")
    assert gone == {"type": "disconnected", "code": 4000, "reason": "account closed", "delay": None}
    assert [frame async for frame in erin] == []  # iteration ends
    assert erin.closed and not erin.connected
    with pytest.raises(ClientClosed):
        await erin.join("lobby")


async def test_close_4001_reconnects_and_rejoins(node: tuple[NodeProcess, Publisher],
                                                  clients: list[HubClient]) -> None:
    proc, publisher = node
    fred = await make(clients, proc.ws_url, user_id="fred", min_delay=0.05).connect()
    await fred.join("moved")
    first = fred.info["conn_id"] if fred.info else None
    assert publisher.disconnect_user("fred", reconnect=True) == 1
    gone = await next_of(fred, "disconnected")
    assert gone["code"] == 4001 and gone["delay"] is not None
    again = await next_of(fred, "connected")
    assert again["data"]["conn_id"] != first
    await wait_until(lambda: publisher.room_members("moved") != [], what="fred to be re-joined to the room")
    publisher.broadcast_to_room("moved", {"type": "note", "data": "still here"})
    assert (await next_of(fred, "note"))["data"] == "still here" and not fred.closed


async def test_server_side_joins_and_member_lists(node: tuple[NodeProcess, Publisher],
                                                  clients: list[HubClient]) -> None:
    """`joined` and `left` change the rooms the client re-joins; presence=True keeps a member list."""
    proc, publisher = node
    gina = await make(clients, proc.ws_url, user_id="gina", presence=True).connect()
    await gina.join("team")
    first = await next_of(gina, "members")
    assert first["users"] == {"gina": 1} and first["change"] is None
    assert gina.members("team") == {"users": {"gina": 1}, "anonymous": 0}
    hal = await make(clients, proc.ws_url, user_id="hal").connect()
    await hal.join("team")
    joined = await next_of(gina, "members")
    assert joined["change"] == {"event": "join", "user_id": "hal"} and set(joined["users"]) == {"gina", "hal"}
    await hal.close()
    left = await next_of(gina, "members")
    assert left["change"] == {"event": "leave", "user_id": "hal"} and gina.members("team") == {
        "users": {"gina": 1}, "anonymous": 0}
    assert publisher.join_user("gina", "war-room") == 1
    event = await next_of(gina, "system_message")
    assert event["data"]["event"] == "joined" and event["data"]["room"] == "war-room"
    assert gina.rooms == {"team", "war-room"}
    assert (await next_of(gina, "members"))["room"] == "war-room"
    assert publisher.leave_user("gina", "war-room") == 1
    assert (await next_of(gina, "system_message"))["data"] == {"event": "left", "room": "war-room"}
    assert gina.rooms == {"team"} and gina.members("war-room") is None


async def test_a_msgpack_client_and_a_json_client_talk(node: tuple[NodeProcess, Publisher],
                                                       clients: list[HubClient]) -> None:
    proc, _ = node
    packed = await make(clients, proc.ws_url, user_id="ivy", msgpack=True).connect()
    plain = await make(clients, proc.ws_url, user_id="jon").connect()
    for client in (packed, plain):
        await client.join("mixed")
    await packed.send_to_room("mixed", {"from": "msgpack"})
    assert (await next_of(plain, "room_message"))["data"]["message"] == {"from": "msgpack"}
    await plain.send_private("ivy", "to msgpack")
    got = await next_of(packed, "private_message")
    assert got["data"]["message"] == "to msgpack" and got["user_id"] == "jon"


async def test_a_refused_handshake_raises_at_once(node: tuple[NodeProcess, Publisher],
                                                  clients: list[HubClient]) -> None:
    proc, _ = node
    client = make(clients, proc.ws_url, user_id="not a valid user id")
    with pytest.raises(HandshakeRefused) as refused:
        await client.connect(timeout=30)
    assert refused.value.status == 400 and client.closed


# -- servers that are not hubs ---------------------------------------------------------------------------
CONNECTED = '{"type":"connected","data":{"conn_id":"x:1","user_id":null,"node":"x"}}'


async def foreign_server(bad: str | bytes | None, after_a_request: bool = False) -> TestServer:
    """An aiohttp server whose /ws sends `bad` first, or `connected` and, once a request came in, `bad`."""
    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        if after_a_request or bad is None:
            await sock.send_str(CONNECTED)
        if after_a_request:
            await sock.receive()
        if bad is not None:
            await (sock.send_bytes(bad) if isinstance(bad, bytes) else sock.send_str(bad))
        async for _ in sock:
            pass
        return sock

    app = web.Application()
    app.router.add_get("/ws", ws)
    server = TestServer(app)
    await server.start_server()
    return server


@pytest.mark.parametrize(("frame", "says"), [
    ("<html>not a hub</html>", "not JSON"),
    ("[1, 2]", "not a map with a string 'type'"),
    ('{"data": 1}', "not a map with a string 'type'"),
    (b"\x93\x01\x02\x03", "binary frame on a JSON \\(text\\) connection"),
])
async def test_a_frame_no_hub_sends_raises_a_clear_error(clients: list[HubClient], frame: str | bytes,
                                                         says: str) -> None:
    """Before `connected`, from connect(); after it, from the request waiting and from iteration."""
    early, late = await foreign_server(frame), await foreign_server(frame, after_a_request=True)
    try:
        client = make(clients, str(early.make_url("/ws")))
        with pytest.raises(BadServerFrame, match=says):
            await client.connect()
        assert client.closed
        client = await make(clients, str(late.make_url("/ws"))).connect()
        with pytest.raises(BadServerFrame, match=says):
            await client.ping()
        with pytest.raises(BadServerFrame, match=says):
            async for _ in client:
                pass
        assert client.closed
    finally:
        await early.close()
        await late.close()


async def test_a_msgpack_client_refuses_a_server_without_the_subprotocol(clients: list[HubClient]) -> None:
    server = await foreign_server(None)
    try:
        client = make(clients, str(server.make_url("/ws")), msgpack=True)
        with pytest.raises(BadServerFrame, match="did not accept the hubnode.msgpack subprotocol"):
            await client.connect()
    finally:
        await server.close()


async def test_requests_made_while_disconnected_wait_for_the_connection(
        redis_server: RedisServer, clients: list[HubClient], session: aiohttp.ClientSession) -> None:
    """A join made before the node is up is sent once the client connects, and answered."""
    proc = NodeProcess("--rate", "0")
    client = make(clients, proc.ws_url, user_id="kim", min_delay=0.05, max_delay=0.2)
    connecting = asyncio.ensure_future(client.connect(timeout=30))
    await wait_until(lambda: client.attempts >= 1, what="a first failed attempt")
    joining = asyncio.ensure_future(client.join("early"))
    proc.start()
    try:
        await connecting
        assert (await joining)["type"] == "ack" and client.rooms == {"early"}
    finally:
        proc.stop()


async def test_a_draining_node_sends_the_client_to_the_next_url_at_once(clients: list[HubClient]) -> None:
    """SIGTERM: the `reconnect` notice and close 1001, then a reconnect without backoff, to the other node."""
    a, b = NodeProcess("--rate", "0", "--node-id", "a"), NodeProcess("--rate", "0", "--node-id", "b")
    start_all([a, b])
    try:
        lena = make(clients, [a.ws_url, b.ws_url], user_id="lena", min_delay=5.0)
        await lena.connect()
        await lena.join("stay")
        assert lena.node == "a"
        a.signal(signal.SIGTERM)
        assert (await next_of(lena, "system_message"))["data"] == {"event": "reconnect"}
        gone = await next_of(lena, "disconnected")
        assert gone["code"] == 1001 and gone["delay"] < 0.1  # not min_delay's 2.5-5 s
        assert (await next_of(lena, "connected"))["data"]["node"] == "b"
        streams = {(e["stream"], e["room"]): e["recovered"] for e in [await next_of(lena, "recovered") for _ in "12"]}
        assert streams == {("user", None): False, ("room", "stay"): False}  # re-joined; no history to recover
        assert lena.rooms == {"stay"}
    finally:
        a.stop()
        b.stop()


# -- what an application does wrong, and what the client must survive (review of issue 17) -------------
async def test_a_handler_that_raises_is_logged_and_the_client_goes_on(
        node: tuple[NodeProcess, Publisher], clients: list[HubClient], caplog: pytest.LogCaptureFixture) -> None:
    proc, publisher = node
    mona = await make(clients, proc.ws_url, user_id="mona").connect()

    def broken(frame: Frame) -> None:
        raise ValueError("a bug in the application")

    async def broken_too(frame: Frame) -> None:
        raise KeyError("an async bug")

    mona.on("note", broken).on("note", broken_too)
    await mona.join("bugs")
    publisher.broadcast_to_room("bugs", {"type": "note", "data": 1})
    assert (await next_of(mona, "note"))["data"] == 1  # iteration still gets it
    await wait_until(lambda: len([r for r in caplog.records if r.name == "hubnode.client"]) == 2,
                     what="both handler errors to be logged")
    assert (await mona.ping("alive"))["data"] == "alive" and mona.connected and not mona.closed
    await mona.close()  # and closing raises nothing


async def test_requests_made_during_a_reconnect_go_after_the_rejoins(
        node: tuple[NodeProcess, Publisher], clients: list[HubClient]) -> None:
    """A message to a joined room sent while disconnected waits, and is not refused with not_in_room."""
    proc, publisher = node
    nina = await make(clients, proc.ws_url, user_id="nina", min_delay=0.3, max_delay=0.3).connect()
    await nina.join("waiting-room")
    assert publisher.disconnect_user("nina", reconnect=True) == 1
    await next_of(nina, "disconnected")
    sent = asyncio.ensure_future(nina.send_to_room("waiting-room", "sent while away"))
    presence = asyncio.ensure_future(nina.presence("waiting-room"))
    assert (await sent)["type"] == "ack" and (await presence)["users"] == {"nina": 1}
    got = await next_of(nina, "room_message")
    assert got["data"]["message"] == "sent while away"


async def test_a_cancelled_request_is_never_sent(node: tuple[NodeProcess, Publisher],
                                                clients: list[HubClient]) -> None:
    proc, publisher = node
    olga = await make(clients, proc.ws_url, user_id="olga", min_delay=0.5, max_delay=0.5).connect()
    pete = await make(clients, proc.ws_url, user_id="pete").connect()
    assert publisher.disconnect_user("olga", reconnect=True) == 1
    await next_of(olga, "disconnected")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(olga.send_private("pete", "given up on"), 0.05)
    await next_of(olga, "connected")
    await olga.send_private("pete", "the next one")  # acked: the cancelled one would have gone before it
    assert (await next_of(pete, "private_message"))["data"]["message"] == "the next one"


async def test_a_full_queue_stops_reading_and_loses_nothing(node: tuple[NodeProcess, Publisher],
                                                            clients: list[HubClient]) -> None:
    """An application that does not read: the client stops reading its node until it does, so the
    messages and the server's decisions behind the bound wait in order; nothing is dropped."""
    proc, publisher = node
    quinn = await make(clients, proc.ws_url, user_id="quinn", queue_size=4).connect()
    await quinn.join("slow")  # the queue holds `connected` and her own presence event
    for n in (1, 2):
        publisher.broadcast_to_room("slow", {"type": "tick", "data": n})
    await wait_until(lambda: quinn.position("slow") is not None and quinn.position("slow").offset == 2,
                     what="both ticks to be queued")
    assert publisher.join_user("quinn", "granted") == 1
    for n in (3, 4, 5):
        publisher.broadcast_to_room("slow", {"type": "tick", "data": n})
    pete = await make(clients, proc.ws_url, user_id="pete2").connect()
    await pete.join("slow")
    await pete.send_to_room("slow", "after all that")  # acked: the node has sent quinn everything before it
    assert quinn.position("slow").offset == 2 and quinn.rooms == {"slow"}  # not read yet
    seen: list[Any] = []
    while not {"joined", "after all that"} <= set(seen):
        frame = await next_of(quinn, "tick", "system_message", "room_message")
        seen.append(frame["data"]["message"] if frame["type"] == "room_message" else
                    frame["data"] if frame["type"] == "tick" else frame["data"]["event"])
    # the room's messages in order; the server's join (another channel) somewhere among them
    assert [x for x in seen if x != "joined"] == [1, 2, 3, 4, 5, "after all that"] and seen.count("joined") == 1
    assert quinn.rooms == {"slow", "granted"} and quinn.connected


async def test_a_refused_client_leaves_nothing_open(node: tuple[NodeProcess, Publisher]) -> None:
    proc, _ = node
    client = HubClient(proc.ws_url, user_id="not valid")  # no fixture closes it
    with pytest.raises(HandshakeRefused):
        async with client:
            pass
    assert client._session is not None and client._session.closed


async def test_values_the_wire_cannot_carry_fail_in_the_caller(node: tuple[NodeProcess, Publisher],
                                                              clients: list[HubClient]) -> None:
    proc, _ = node
    rita = await make(clients, proc.ws_url, user_id="rita").connect()
    with pytest.raises(TypeError):
        await rita.broadcast({1, 2})
    with pytest.raises(ValueError):
        await rita.broadcast(float("nan"))
    assert (await rita.ping("fine"))["data"] == "fine" and not rita._pending


async def test_without_reconnect_a_node_that_is_down_fails_connect_at_once(clients: list[HubClient]) -> None:
    port = NodeProcess().port  # nothing listens there
    client = make(clients, f"ws://127.0.0.1:{port}/ws", reconnect=False)
    with pytest.raises(Disconnected, match="could not connect"):
        await client.connect(timeout=30)
