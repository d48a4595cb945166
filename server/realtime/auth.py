"""JWT identities: who a connection is comes from its verified token alone (HS256 only)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

import jwt

from giftstream.protocol.rules import ID_RULE, is_id

_ALGORITHMS = ["HS256"]  # a token naming any other algorithm, `none` included, is refused


class Role(StrEnum):
    VIEWER = "viewer"
    CREATOR = "creator"
    OPS = "ops"


class AuthError(Exception):
    """The token is missing, malformed, badly signed, expired or carries bad claims."""


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    name: str
    role: Role
    adult: bool

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
) -> str:
    """A signed token for `user`, as the platform's login service would issue it."""
    if not is_id(user):
        raise ValueError(f"user id must be {ID_RULE}")
    issued = int(now if now is not None else time.time())
    claims = {
        "sub": user,
        "name": name or user,
        "role": role.value,
        "adult": adult,
        "iat": issued,
        "exp": issued + ttl_s,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_token(secret: str, token: object) -> Identity:
    """The identity a token proves, or AuthError saying why it proves nothing."""
    if not isinstance(token, str) or not token:
        raise AuthError("missing token")
    try:
        claims = jwt.decode(
            token, secret, algorithms=_ALGORITHMS, options={"require": ["sub", "exp"]}
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("token expired") from exc
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
    return Identity(user=user, name=name, role=role, adult=adult)
