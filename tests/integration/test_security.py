"""Security: JWT identity, room authorization, origins, limits and hooks (docs/protocol.md 1, 3, 4)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hubnode import Node, create_app
from hubnode.auth import AuthError, Identity, builtin_authorize
from hubnode.config import Config, ConfigError
from tests.conftest import node_config, start_server
from tests.helpers import Client, wait_until

SECRET = "s3cret-for-tests-that-is-32-bytes-long"


def token(claims: dict[str, Any] | None = None, key: Any = SECRET, alg: str = "HS256", **extra: Any) -> str:
    base: dict[str, Any] = {"sub": "alice", "exp": int(time.time()) + 300}
    base.update(claims or {})
    base.update(extra)
    return jwt.encode(base, key, algorithm=alg)


@pytest.fixture
async def jwt_hub() -> AsyncIterator[TestServer]:
    server = await start_server(node_config(auth="jwt", jwt_secret=SECRET, jwt_audience="hub",
                                            jwt_leeway=0))
    yield server
    await server.close()


def url(server: TestServer, query: str = "") -> str:
    return str(server.make_url("/ws")) + (f"?{query}" if query else "")


async def refused(session: aiohttp.ClientSession, target: str, headers: dict[str, str] | None = None) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
        await session.ws_connect(target, headers=headers)
    return err.value.status


async def test_hs256_token_in_query_and_header(jwt_hub: TestServer, session: aiohttp.ClientSession) -> None:
    """A valid HS256 token is accepted from ?token= and from Authorization: Bearer; sub is the user."""
    a = await Client.open(session, url(jwt_hub, f"token={token(aud='hub')}"))
    assert a.connected["user_id"] == "alice"
    b = await Client.open(session, url(jwt_hub), headers={"Authorization": f"Bearer {token(aud='hub', sub='bob')}"})
    assert b.connected["user_id"] == "bob"


async def test_spoofed_user_id_is_ignored(jwt_hub: TestServer, session: aiohttp.ClientSession) -> None:
    """In jwt mode a client-supplied ?user_id= does not change who the client is."""
    a = await Client.open(session, url(jwt_hub, f"token={token(aud='hub')}&user_id=mallory"))
    assert a.connected["user_id"] == "alice"


@pytest.mark.parametrize("bad", [
    "missing", "garbage", "wrong-key", "alg-none", "expired", "not-yet-valid", "wrong-audience", "no-exp",
    "no-sub", "bad-sub",
])
async def test_bad_tokens_get_401(jwt_hub: TestServer, session: aiohttp.ClientSession, bad: str) -> None:
    """Every kind of bad token is refused with 401 before the upgrade, with a short reason."""
    now = int(time.time())
    tokens = {
        "garbage": "not.a.token",
        "wrong-key": token(key="another-secret-of-at-least-32-bytes", aud="hub"),
        "alg-none": jwt.encode({"sub": "alice", "exp": now + 60, "aud": "hub"}, None, algorithm="none"),
        "expired": token(aud="hub", exp=now - 30),
        "not-yet-valid": token(aud="hub", nbf=now + 300),
        "wrong-audience": token(aud="elsewhere"),
        "no-exp": jwt.encode({"sub": "alice", "aud": "hub"}, SECRET, algorithm="HS256"),
        "no-sub": jwt.encode({"exp": now + 60, "aud": "hub"}, SECRET, algorithm="HS256"),
        "bad-sub": token(aud="hub", sub="has space"),
    }
    query = "" if bad == "missing" else f"token={tokens[bad]}"
    resp = await session.get(url(jwt_hub, query), headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                           "Sec-WebSocket-Version": "13",
                                                           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert resp.status == 401
    assert (await resp.json())["error"]


def hs256_by_hand(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token made without PyJWT's guard against asymmetric keys as HMAC secrets."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + b64(json.dumps(claims).encode())
    return (signing + b"." + b64(hmac.new(secret, signing, hashlib.sha256).digest())).decode()


@pytest.fixture
def rsa_key(tmp_path: Path) -> tuple[Any, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "rsa.pem"
    path.write_bytes(pem)
    return key, str(path)


async def test_rs256_and_algorithm_confusion(rsa_key: tuple[Any, str], session: aiohttp.ClientSession) -> None:
    """RS256 tokens verify with the public key; an HS256 token signed with that public key is refused."""
    key, path = rsa_key
    server = await start_server(node_config(auth="jwt", jwt_public_key=path, jwt_issuer="me"))
    try:
        ok = await Client.open(session, url(server, f"token={token(key=key, alg='RS256', iss='me')}"))
        assert ok.connected["user_id"] == "alice"
        assert await refused(session, url(server, f"token={token(key=key, alg='RS256', iss='you')}")) == 401
        # the classic confusion: HMAC with the public key's bytes as the secret
        forged = hs256_by_hand({"sub": "alice", "iss": "me", "exp": int(time.time()) + 60},
                               Path(path).read_bytes())
        assert await refused(session, url(server, f"token={forged}")) == 401
        assert await refused(session, url(server, f"token={token(key=SECRET, iss='me')}")) == 401
    finally:
        await server.close()


async def test_es256(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    """An EC P-256 public key accepts ES256 tokens."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ec.pem"
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    server = await start_server(node_config(auth="jwt", jwt_public_key=str(path)))
    try:
        ok = await Client.open(session, url(server, f"token={token(key=key, alg='ES256', sub='eve')}"))
        assert ok.connected["user_id"] == "eve"
    finally:
        await server.close()


async def test_rooms_claim_limits_joins(jwt_hub: TestServer, session: aiohttp.ClientSession) -> None:
    """The `rooms` claim allows exact names and prefix* patterns; other joins are forbidden."""
    a = await Client.open(session, url(jwt_hub, f"token={token(aud='hub', rooms=['lobby', 'team-*'])}"))
    await a.join("lobby", 1)
    await a.join("team-red", 2)
    reply = await a.request("join_room", "admin", 3)
    assert reply["type"] == "error" and reply["data"]["code"] == "forbidden"
    assert (await a.request("join_room", "lobby2", 4))["data"]["code"] == "forbidden"


async def test_jwt_mode_disables_client_broadcast_by_default(jwt_hub: TestServer,
                                                             session: aiohttp.ClientSession) -> None:
    """In jwt mode client broadcast is off unless --client-broadcast on."""
    a = await Client.open(session, url(jwt_hub, f"token={token(aud='hub')}"))
    assert (await a.request("broadcast", 1, 1))["data"]["code"] == "forbidden"
    assert (await a.request("private_message", {"user_id": "bob", "message": 1}, 2))["type"] == "ack"


async def test_token_expiry_closes_1008(jwt_hub: TestServer, session: aiohttp.ClientSession) -> None:
    """A connection whose token expires is closed with 1008."""
    a = await Client.open(session, url(jwt_hub, f"token={token(aud='hub', exp=int(time.time()) + 2)}"))
    assert await a.closed_with(timeout=6) == 1008


async def test_allowed_origins(session: aiohttp.ClientSession) -> None:
    """--allowed-origins admits exactly the listed origins (403 otherwise); no Origin is not a browser."""
    server = await start_server(node_config(allowed_origins=("https://app.example",)))
    try:
        ok = await session.ws_connect(url(server), headers={"Origin": "https://app.example"})
        await ok.close()
        assert await refused(session, url(server), {"Origin": "http://localhost:3000"}) == 403
        assert await refused(session, url(server), {"Origin": "https://evil.example"}) == 403
        plain = await session.ws_connect(url(server))
        await plain.close()
    finally:
        await server.close()


def test_jwt_node_on_public_address_needs_api_key() -> None:
    """A jwt node on a non-loopback address refuses to start without --api-key or --allow-anonymous."""
    with pytest.raises(ConfigError, match="api-key"):
        Config(host="0.0.0.0", auth="jwt", jwt_secret=SECRET).check_exposure()
    Config(host="0.0.0.0", auth="jwt", jwt_secret=SECRET, api_key=("k",)).check_exposure()
    with pytest.raises(ConfigError):
        Config(auth="jwt")
    with pytest.raises(ConfigError, match="32 bytes"):
        Config(auth="jwt", jwt_secret="short")


async def test_connections_per_user_newest_refused(session: aiohttp.ClientSession) -> None:
    """Past --max-connections-per-user the newest handshake gets 429; the old ones keep working."""
    server = await start_server(node_config(max_connections_per_user=2))
    try:
        first = [await Client.open(session, url(server, "user_id=u")) for _ in range(2)]
        assert await refused(session, url(server, "user_id=u")) == 429
        other = await Client.open(session, url(server, "user_id=v"))
        assert other.connected["user_id"] == "v"
        assert (await first[0].request("ping", 1, 1))["type"] == "pong"
    finally:
        await server.close()


async def test_sustained_rate_abuse_closes_1008_bystander_unaffected(session: aiohttp.ClientSession) -> None:
    """Flooding past the rate gets rate_limited, then close 1008; another client keeps receiving."""
    server = await start_server(node_config(rate=1, burst=5))
    try:
        abuser = await Client.open(session, url(server, "user_id=abuser"))
        bystander = await Client.open(session, url(server, "user_id=ok"))
        await bystander.join("r")
        for i in range(40):
            await abuser.send({"type": "ping", "data": i})
        codes = []
        while len(codes) < 11:
            frame = await abuser.recv()
            if frame["type"] == "error":
                codes.append(frame["data"]["code"])
        assert set(codes) == {"rate_limited"}
        assert await abuser.closed_with() == 1008
        await session.post(server.make_url("/broadcast"), json={"type": "t", "room": "r"})
        assert (await bystander.recv_type("t"))["room"] == "r"
    finally:
        await server.close()


async def test_custom_hooks_replace_builtins(session: aiohttp.ClientSession) -> None:
    """authenticate/authorize hooks decide identity and permissions; built-ins can be extended."""
    config = node_config()
    builtin = builtin_authorize(config)

    async def authenticate(request: aiohttp.web.Request) -> Identity:
        if request.headers.get("X-Api-User") is None:
            raise AuthError("who are you?", status=401)
        return Identity(user_id=request.headers["X-Api-User"])

    async def authorize(identity: Identity, action: str, target: str | None) -> bool:
        if action == "join_room" and target == "vip":
            return identity.user_id == "boss"
        return await builtin(identity, action, target)

    server = TestServer(create_app(config, Node(config, authenticate=authenticate, authorize=authorize)),
                        host="127.0.0.1", port=0)
    await server.start_server()
    try:
        assert await refused(session, url(server)) == 401
        boss = await Client.open(session, url(server), headers={"X-Api-User": "boss"})
        intern = await Client.open(session, url(server), headers={"X-Api-User": "intern"})
        await boss.join("vip")
        assert (await intern.request("join_room", "vip", 1))["data"]["code"] == "forbidden"
        await intern.join("lobby")
        # A hook's user id must keep the name rules (a brace would move the user's keys to another slot).
        for bad in ("a{b}", "two words", "x" * 129):
            async with session.get(url(server), headers={"X-Api-User": bad, "Connection": "Upgrade",
                                                          "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                                                          "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as resp:
                assert resp.status == 500, bad
                assert (await resp.json())["error"].startswith("the authenticate hook returned a user id that")
        assert await boss.request("ping", "still here", 2)  # nobody else was disturbed
    finally:
        await server.close()


async def test_dead_client_removed_after_ping_timeout(session: aiohttp.ClientSession) -> None:
    """A client that stops answering pings is closed and leaves its rooms after the timeout."""
    server = await start_server(node_config(ping_interval=0.3, ping_timeout=0.3))
    try:
        alive = await Client.open(session, url(server, "user_id=alive"))
        await alive.join("r")
        dead_ws = await session.ws_connect(url(server, "user_id=dead"), autoping=False)
        await dead_ws.receive()  # connected
        await dead_ws.send_json({"type": "join_room", "data": "r"})
        members = server.make_url("/api/rooms/r")

        async def count() -> int:
            return len((await (await session.get(members)).json())["members"])

        await wait_until(lambda: _eq(count(), 2), what="both joined")
        started = time.monotonic()

        async def alive_answers() -> bool:  # the live client keeps answering (its reads reply to pings)
            with_timeout = asyncio.create_task(alive.ws.receive(timeout=0.05))
            try:
                await with_timeout
            except TimeoutError:
                pass
            return await count() == 1

        await wait_until(alive_answers, timeout=5, what="dead client removed")
        assert time.monotonic() - started >= 0.6 * 0.9  # not before interval + timeout
        assert (await alive.request("ping", 1, "p"))["type"] == "pong"
        await dead_ws.close()  # release both sockets now, or the GC reports an unclosed connection later
        await alive.close()
    finally:
        await server.close()


async def _eq(coro: Any, expected: Any) -> bool:
    return await coro == expected


async def test_dead_client_removed_from_redis_membership(redis_server: Any, session: aiohttp.ClientSession) -> None:
    """In cluster mode a client that stops answering pings also leaves Redis membership."""
    import redis as redis_sync

    from tests.helpers import Cluster

    prefix = "dead:"
    cluster = Cluster(redis_server.url, prefix, n=1, extra=("--ping-interval", "0.3", "--ping-timeout", "0.3"))
    cluster.start()
    r = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        dead_ws = await session.ws_connect(f"{cluster.nodes[0].ws_url}?user_id=ghost", autoping=False)
        await dead_ws.receive()  # connected
        await dead_ws.send_json({"type": "join_room", "data": "haunted", "id": 1})
        await dead_ws.receive()  # ack
        assert r.hlen(f"{prefix}members:{{haunted}}") == 1
        await wait_until(lambda: r.hlen(f"{prefix}members:{{haunted}}") == 0
                         and r.hlen(f"{prefix}online:{{ghost}}") == 0, timeout=5, what="ghost removed from Redis")
    finally:
        cluster.stop()
