"""JWT identities: who a connection is comes from its verified token alone (HS256 only), and
for how long: a connection is closed once its token's `exp` (plus the leeway) has passed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

import jwt

from giftstream.protocol.rules import ID_RULE, is_id

_ALGORITHMS = ["HS256"]  # a token naming any other algorithm, `none` included, is refused
# Clocks of the login service and of this server disagree by a few seconds: a token issued
# "in the future" by that much, or expired by that much, is still good.
DEFAULT_LEEWAY_S = 30.0


class Role(StrEnum):
    VIEWER = "viewer"
    CREATOR = "creator"
    OPS = "ops"


class AuthError(Exception):
    """The token is missing, malformed, badly signed, expired or carries bad claims."""


@dataclass(frozen=True, slots=True)
class TokenRules:
    """How tokens are checked: the HS256 secret, the clock leeway for `exp`, `nbf` and
    `iat`, and the audience and issuer a token must name when they are configured."""

    secret: str
    leeway_s: float = DEFAULT_LEEWAY_S
    audience: str | None = None
    issuer: str | None = None


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    name: str
    role: Role
    adult: bool
    valid_until: float = float("inf")  # Unix seconds: the token's `exp` plus the leeway

    @property
    def can_go_live(self) -> bool:
        return self.role is Role.CREATOR

    @property
    def can_watch(self) -> bool:
        return self.role is Role.OPS


def mint_token(
    secret: str,
    user: str,
    *,
    name: str | None = None,
    role: Role = Role.VIEWER,
    adult: bool = True,
    ttl_s: int = 86400,
    now: float | None = None,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """A signed token for `user`, as the platform's login service would issue it."""
    if not is_id(user):
        raise ValueError(f"user id must be {ID_RULE}")
    issued = int(now if now is not None else time.time())
    claims: dict[str, object] = {
        "sub": user,
        "name": name or user,
        "role": role.value,
        "adult": adult,
        "iat": issued,
        "exp": issued + ttl_s,
    }
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_token(rules: TokenRules, token: object) -> Identity:
    """The identity a token proves, or AuthError saying why it proves nothing. A token that
    names an audience is refused unless it is ours (RFC 7519 4.1.3), so a token minted for
    another service is never taken here."""
    if not isinstance(token, str) or not token:
        raise AuthError("missing token")
    try:
        claims = jwt.decode(
            token,
            rules.secret,
            algorithms=_ALGORITHMS,
            options={"require": ["sub", "exp"]},
            leeway=rules.leeway_s,
            audience=rules.audience,
            issuer=rules.issuer,
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("token expired") from exc
    except jwt.ImmatureSignatureError as exc:
        raise AuthError("token not yet valid (iat or nbf ahead of the server's clock)") from exc
    except jwt.InvalidAudienceError as exc:
        raise AuthError("token audience is not this server's") from exc
    except jwt.InvalidIssuerError as exc:
        raise AuthError("token issuer is not the configured one") from exc
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from exc
    user = claims.get("sub")
    if not is_id(user):
        raise AuthError("token sub is not a valid user id")
    name = claims.get("name", user)
    if not isinstance(name, str) or not name.strip() or len(name) > 64:
        raise AuthError("token name must be a non-empty string of at most 64 characters")
    try:
        role = Role(claims.get("role", Role.VIEWER.value))
    except ValueError as exc:
        raise AuthError("token role must be viewer, creator or ops") from exc
    adult = claims.get("adult", False)  # unverified age counts as a minor
    if not isinstance(adult, bool):
        raise AuthError("token adult claim must be true or false")
    valid_until = float(claims["exp"]) + rules.leeway_s
    return Identity(user=user, name=name, role=role, adult=adult, valid_until=valid_until)
