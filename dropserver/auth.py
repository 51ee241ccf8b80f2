"""Authentication with PyJWT and role checks.

* Development (`dropserver dev`): HS256 tokens signed with a shared secret; the
  ``dropserver token`` command issues them.
* Production: RS256/ES256 tokens from an identity provider (Clerk, Auth0, Better
  Auth), verified against its JWKS URL. Keys are fetched by PyJWT's
  :class:`jwt.PyJWKClient` (cached, refreshed on an unknown ``kid``) in a thread so
  the event loop never blocks on the network.

Roles: ``viewer``, ``creator``, ``admin``, ``investor``. Guests (no token) may watch;
buying and chatting need a token; creators act only on their own drops.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.algorithms import HMACAlgorithm
from starlette.requests import HTTPConnection

from dropserver.errors import Forbidden, Unauthorized
from dropserver.settings import Settings
from dropserver.text import text_problem

__all__ = [
    "Principal",
    "Role",
    "TokenVerifier",
    "bearer_token",
    "issue_token",
    "principal",
    "require",
    "require_drop_owner",
]

_ASYMMETRIC = ["RS256", "ES256"]
_MAX_SUB_LEN = 128


class Role(enum.StrEnum):
    VIEWER = "viewer"
    CREATOR = "creator"
    ADMIN = "admin"
    INVESTOR = "investor"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. ``user_id`` is the token's ``sub``; guests have none."""

    user_id: str | None
    role: Role | None
    name: str = ""
    claims: dict[str, Any] | None = None

    @property
    def is_guest(self) -> bool:
        return self.user_id is None

    def can_manage(self, creator_id: str) -> bool:
        """True for the drop's own creator and for admins."""
        return self.role is Role.ADMIN or (
            self.role is Role.CREATOR and self.user_id == creator_id
        )


GUEST = Principal(user_id=None, role=None)


class _PreparedHMAC(HMACAlgorithm):
    """HS256 with each secret checked and prepared once, not once per token.

    PyJWT's ``prepare_key`` tries the secret as a DER public key, an X.509
    certificate and a JSON key on every call, ~30 us of a ~70 us verify: a node taking
    back a crashed node's viewers verifies a token per join. The answer for one
    secret never changes; a secret it refuses is refused every time (not kept)."""

    def __init__(self) -> None:
        super().__init__(HMACAlgorithm.SHA256)
        self._prepared: dict[str | bytes, bytes] = {}

    def prepare_key(self, key: str | bytes) -> bytes:
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = super().prepare_key(key)
            if len(self._prepared) < 8:  # a process has one secret (tests: a few)
                self._prepared[key] = prepared
        return prepared


def _hs256_decoder() -> jwt.PyJWT:
    """A PyJWT decoder of its own whose HS256 is :class:`_PreparedHMAC` (the module's
    shared decoder, ``jwt.decode``, stays as it is)."""
    decoder = jwt.PyJWT()
    jws = getattr(decoder, "_jws", None)  # PyJWT 2.x; without it, the plain HS256
    if jws is not None:
        jws.unregister_algorithm("HS256")
        jws.register_algorithm("HS256", _PreparedHMAC())
    return decoder


class TokenVerifier:
    """Verifies bearer tokens according to :class:`Settings`."""

    def __init__(self, settings: Settings) -> None:
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer or None
        self.role_claim = settings.jwt_role_claim
        self.secret = settings.effective_jwt_secret
        self._jwks: jwt.PyJWKClient | None = None
        self._hs256 = _hs256_decoder()
        if settings.jwks_url:
            self._jwks = jwt.PyJWKClient(settings.jwks_url, cache_keys=True, lifespan=300)

    async def verify(self, token: str) -> Principal:
        """Return the principal, or raise :class:`Unauthorized` with a reason code."""
        if not token:
            raise Unauthorized("missing bearer token", code="token_missing")
        try:
            if self._jwks is not None:
                signing_key = await asyncio.to_thread(
                    self._jwks.get_signing_key_from_jwt, token
                )
                key: Any = signing_key.key
                algorithms = _ASYMMETRIC
            else:
                if not self.secret:
                    raise Unauthorized("token verification is not configured",
                                       code="token_invalid")
                key = self.secret
                algorithms = ["HS256"]
            decode = jwt.decode if self._jwks is not None else self._hs256.decode
            claims = decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "sub", "aud"]},
                leeway=10,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token has expired", code="token_expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("token audience is not this server",
                               code="token_wrong_audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("token issuer is not trusted",
                               code="token_wrong_issuer") from None
        except jwt.PyJWKClientError as exc:
            raise Unauthorized(f"no signing key for token: {exc}",
                               code="token_invalid") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}", code="token_invalid") from None
        return self._principal(claims)

    def _principal(self, claims: dict[str, Any]) -> Principal:
        sub = claims.get("sub")
        if (not isinstance(sub, str) or not sub or len(sub) > _MAX_SUB_LEN
                or text_problem(sub) is not None):  # it is stored: users.id
            raise Unauthorized("token subject is invalid", code="token_invalid")
        raw_role = claims.get(self.role_claim, Role.VIEWER.value)
        try:
            role = Role(raw_role)
        except ValueError:
            raise Unauthorized(f"unknown role {raw_role!r}", code="token_invalid") from None
        name = claims.get("name")
        return Principal(user_id=sub, role=role,
                         name=name if isinstance(name, str) else sub, claims=claims)


def issue_token(
    settings: Settings,
    sub: str,
    role: Role | str = Role.VIEWER,
    *,
    ttl: int = 24 * 3600,
    name: str | None = None,
    audience: str | None = None,
    now: float | None = None,
) -> str:
    """Sign an HS256 token with the configured (or dev) secret."""
    secret = settings.effective_jwt_secret
    if not secret:
        raise RuntimeError("no HS256 secret: set DROPSERVER_JWT_SECRET")
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": sub,
        settings.jwt_role_claim: Role(role).value,
        "aud": audience or settings.jwt_audience,
        "iat": issued,
        "exp": issued + ttl,
    }
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if name:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm="HS256")


def bearer_token(conn: HTTPConnection) -> str | None:
    """The token from ``Authorization: Bearer``, or ``?token=`` (WebSockets, HLS)."""
    header = conn.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("Authorization must be 'Bearer <token>'",
                               code="token_invalid")
        return value.strip()
    return conn.query_params.get("token") or None


async def principal(conn: HTTPConnection) -> Principal:
    """The caller, or :data:`GUEST` when no token was sent. A bad token is a 401."""
    token = bearer_token(conn)
    if token is None:
        return GUEST
    verifier: TokenVerifier = conn.app.state.verifier
    return await verifier.verify(token)


async def require(conn: HTTPConnection, *roles: Role) -> Principal:
    """The caller, who must be signed in and (when given) hold one of ``roles``."""
    who = await principal(conn)
    if who.is_guest:
        raise Unauthorized("sign in first", code="token_missing")
    if roles and who.role not in roles and who.role is not Role.ADMIN:
        allowed = ", ".join(r.value for r in roles)
        raise Forbidden(f"requires role {allowed}", code="forbidden_role")
    return who


def require_drop_owner(who: Principal, creator_id: str) -> None:
    """Raise 403 unless ``who`` is the drop's creator or an admin."""
    if not who.can_manage(creator_id):
        raise Forbidden("only the drop's creator may do this", code="not_drop_owner")
