"""examples/app.py: an aiohttp application with a hub mounted next to its own routes, behind JWT.

Run it with the venv `make run` made (or, in your own venv, `pip install 'hubnode[server]'` first):

    .venv/bin/python examples/app.py

It serves on http://127.0.0.1:8082 (HUB_PORT). Tokens are signed with HUB_JWT_SECRET (at least 32
bytes); without it the app makes a random secret at start, so its tokens die with the process. Give
every process of one deployment the same secret and the same HUB_REDIS_URL (`make cluster` prints
the line to export); without HUB_REDIS_URL the hub runs alone. Browsers may connect from the app's
own origin, http://127.0.0.1:8082 and http://localhost:8082 (HUB_ALLOWED_ORIGINS: a comma-separated
list of origins, or *); clients that send no Origin header (not browsers) are not checked.

The routes:

    POST /login {"user": U}             -> {"token": T, "user": U, "expires_in": 3600}
    GET  /ws?token=T                    the hub: the WebSocket of docs/protocol.md, user U
    POST /rooms/<room>/announce {"text": S}, with Authorization: Bearer T
                                        -> {"nodes": N}: every member of the room gets
                                           {"type": "announcement", "room": R, "user_id": U, "data": {"text": S}, ...}
    GET  /stats                         -> {"clients": N, "rooms": {room: members}}

From a shell:

    TOKEN=$(curl -s -X POST http://127.0.0.1:8082/login -H 'Content-Type: application/json' \\
            -d '{"user":"alice"}' | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
    websocat "ws://127.0.0.1:8082/ws?token=$TOKEN"     # any WebSocket client; then send
        {"type":"join_room","data":"lobby","id":1}
    curl -X POST http://127.0.0.1:8082/rooms/lobby/announce -H "Authorization: Bearer $TOKEN" \\
         -H 'Content-Type: application/json' -d '{"text":"hello lobby"}'

A token without a valid signature, `sub` or `exp` is refused with 401 before the upgrade. The login
route here hands a token to anyone who names a user: a real application checks a password, a
session or single sign-on there, and may restrict the rooms with a `rooms` claim (docs/security.md).
"""

import os
import secrets
import time

import jwt
from aiohttp import web

from hubnode import Config, Node, mount
from hubnode.auth import AuthError, JwtVerifier
from hubnode.broker import BrokerUnavailable
from publisher import check_name

HOST = "127.0.0.1"  # loopback; behind a proxy, or change it together with HUB_ALLOWED_ORIGINS
PORT = int(os.environ.get("HUB_PORT", "8082"))
SECRET = os.environ.get("HUB_JWT_SECRET") or secrets.token_urlsafe(32)
ORIGINS = os.environ.get("HUB_ALLOWED_ORIGINS") or f"http://127.0.0.1:{PORT},http://localhost:{PORT}"
TOKEN_SECONDS = 3600

config = Config(
    host=HOST,
    port=PORT,
    auth="jwt",
    jwt_secret=SECRET,  # HS256; Config refuses a secret shorter than 32 bytes
    allowed_origins=tuple(o.strip() for o in ORIGINS.split(",")),
    redis_url=os.environ.get("HUB_REDIS_URL") or None,
)
node = Node(config)
verifier = JwtVerifier(config)  # the checks the hub makes at /ws, for the app's own routes


def issue_token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + TOKEN_SECONDS}, SECRET, algorithm="HS256")


async def json_object(request: web.Request) -> dict[str, object]:
    """The request's JSON object body, or {} when it is anything else."""
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


async def login(request: web.Request) -> web.Response:
    # A real application checks a password, a session or single sign-on here.
    user = (await json_object(request)).get("user")
    if not isinstance(user, str) or check_name(user):  # what the hub accepts as a user id
        return web.json_response({"error": f"user {check_name(user)}"}, status=400)
    return web.json_response({"token": issue_token(user), "user": user, "expires_in": TOKEN_SECONDS})


async def announce(request: web.Request) -> web.Response:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme != "Bearer" or not token:
        return web.json_response({"error": "missing token (Authorization: Bearer)"}, status=401)
    try:
        identity = verifier.verify(token.strip())
    except AuthError as exc:
        return web.json_response({"error": exc.reason}, status=exc.status)
    text = (await json_object(request)).get("text")
    if not isinstance(text, str):
        return web.json_response({"error": "expected {\"text\": \"...\"}"}, status=400)
    message = {"type": "announcement", "user_id": identity.user_id, "data": {"text": text}}
    try:
        nodes = await node.broadcast_to_room(request.match_info["room"], message)
    except ValueError as exc:  # a bad room name or message: nothing was sent
        return web.json_response({"error": str(exc)}, status=400)
    except BrokerUnavailable as exc:  # Redis is unreachable
        return web.json_response({"error": str(exc)}, status=503)
    return web.json_response({"nodes": nodes})


async def stats(_request: web.Request) -> web.Response:
    return web.json_response({"clients": await node.client_count(), "rooms": await node.rooms()})


app = web.Application()
app.router.add_post("/login", login)
app.router.add_post("/rooms/{room}/announce", announce)
app.router.add_get("/stats", stats)
mount(app, node, path="/ws")  # the node starts with the app and drains when it stops

if __name__ == "__main__":
    web.run_app(app, host=HOST, port=PORT)
