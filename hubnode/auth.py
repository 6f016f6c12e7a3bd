"""Who a connection is, and what it may do (docs/protocol.md).

Two built-in identity modes: `none` (the `?user_id=` of the seed, for
loopback and trusted networks) and `jwt` (PyJWT; the accepted algorithms come
from the configuration, never from the token, so algorithm confusion and
`alg: none` are impossible). Library users can replace either hook:

    async def authenticate(request) -> Identity        # raise AuthError to refuse
    async def authorize(identity, action, target) -> bool

and call the built-ins from their own hooks to extend rather than replace them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from hubnode.config import Config, ConfigError
from hubnode.policy import room_allowed
from publisher.names import check_name

log = logging.getLogger(__name__)

__all__ = ["ACTIONS", "AuthError", "Authenticate", "Authorize", "Identity", "JwtVerifier",
           "builtin_authenticate", "builtin_authorize", "checked_user_ids"]

ACTIONS = ("join_room", "room_message", "broadcast", "private_message")
"""The actions `authorize` is asked about; the target is a room, a user id or None."""


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated (or anonymous) client.

    `rooms` None means no room restriction; `expires_at` (Unix seconds) closes
    the connection with 1008 when reached.
    """

    user_id: str | None
    rooms: tuple[str, ...] | None = None
    expires_at: float | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)


class AuthError(Exception):
    """A refused handshake: sent as an HTTP error before the upgrade."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


Authenticate = Callable[[web.Request], Awaitable[Identity]]
Authorize = Callable[[Identity, str, "str | None"], Awaitable[bool]]


class JwtVerifier:
    """Verifies tokens with the key and algorithms fixed by the configuration."""

    def __init__(self, config: Config) -> None:
        self.audience = config.jwt_audience
        self.issuer = config.jwt_issuer
        self.leeway = config.jwt_leeway
        if config.jwt_secret:
            self.key: Any = config.jwt_secret
            self.algorithms = ["HS256"]
        elif config.jwt_public_key:
            self.key, self.algorithms = _load_public_key(config.jwt_public_key)
        else:
            raise ConfigError("no JWT key configured")

    def verify(self, token: str) -> Identity:
        try:
            claims = jwt.decode(token, self.key, algorithms=self.algorithms, audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway,
                                options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong token audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong token issuer") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        sub = claims.get("sub")
        if check_name(sub) is not None:
            raise AuthError("token 'sub' is not a valid user id")
        return Identity(user_id=sub, rooms=_rooms_claim(claims.get("rooms")),
                        expires_at=float(claims["exp"]), claims=claims)


def _load_public_key(path: str) -> tuple[Any, list[str]]:
    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read --jwt-public-key {path}: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, ["RS256"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = _EC_ALGORITHMS.get(key.curve.name)
        if algorithm is not None:
            return key, [algorithm]
    raise ConfigError("--jwt-public-key must be an RSA key (RS256) or an EC key on P-256, P-384 or "
                      "P-521 (ES256, ES384, ES512)")


_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


def _rooms_claim(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AuthError("token 'rooms' claim must be a list of strings")
    return tuple(value)


def token_of(request: web.Request) -> str | None:
    """The token from `?token=` or `Authorization: Bearer`."""
    token = request.query.get("token")
    if token:
        return token
    header = request.headers.get("Authorization", "")
    return header[7:].strip() or None if header.startswith("Bearer ") else None


def checked_user_ids(hook: Authenticate) -> Authenticate:
    """An application's own `authenticate` hook, whose user ids are held to the name rules.

    The built-in hooks check what they accept; a custom hook's id breaking the rules would break the
    user's Redis keys and channel (a brace moves them to another hash slot). That is a bug in the
    hook: the handshake is refused with 500 and the node logs it.
    """

    async def authenticate(request: web.Request) -> Identity:
        identity = await hook(request)
        problem = check_name(identity.user_id) if identity.user_id is not None else None
        if problem:
            log.error("authenticate hook returned a user id that %s: %r", problem, str(identity.user_id)[:140])
            raise AuthError(f"the authenticate hook returned a user id that {problem}", status=500)
        return identity

    return authenticate


def builtin_authenticate(config: Config) -> Authenticate:
    """The configured mode's authenticate hook."""
    if config.auth == "jwt":
        verifier = JwtVerifier(config)

        async def by_token(request: web.Request) -> Identity:
            token = token_of(request)
            if token is None:
                raise AuthError("missing token (?token= or Authorization: Bearer)")
            return verifier.verify(token)

        return by_token

    async def by_query(request: web.Request) -> Identity:
        user_id = request.query.get("user_id")
        if user_id is not None:
            problem = check_name(user_id)
            if problem:
                raise AuthError(f"user_id {problem}", status=400)
        return Identity(user_id=user_id)

    return by_query


def builtin_authorize(config: Config) -> Authorize:
    """Room claims for joins; the client_broadcast / client_private switches."""

    async def authorize(identity: Identity, action: str, target: str | None) -> bool:
        if action == "join_room":
            return room_allowed(identity.rooms, target or "")
        if action == "broadcast":
            return bool(config.client_broadcast)
        if action == "private_message":
            return config.client_private
        return True

    return authorize
