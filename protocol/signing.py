"""The internal HTTP API's request signature, revision 2 (PROTOCOL.md §3): sign and verify.

    X-Giftstream-Signature: t=<unix seconds>,v1=<hex>

`v1` is the hex HMAC-SHA256, keyed with the webhook secret, of `<t>` LF `<METHOD>` LF
`<path with its query string>` LF `<raw body>`. Binding the time, the method and the path
makes a signature good for one request, for five minutes: a signed purchase cannot be
replayed as a refund, nor a read of one wallet as a read of another. Revision 1 signed the
body alone (or the path of a GET) and is refused.

Pure: no I/O and no clock. The caller passes the time in, so tests move it by hand and the
server checks it against its own injectable clock.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_SIGNATURES",
    "MAX_SKEW_S",
    "SIGNATURE_HEADER",
    "SignatureError",
    "SignatureHeader",
    "parse_signature_header",
    "sign_request",
    "signature",
    "signed_payload",
    "verify",
]

SIGNATURE_HEADER: Final = "X-Giftstream-Signature"
MAX_SKEW_S: Final = 300  # how far `t` may be from the server's clock, past or future
MAX_SIGNATURES: Final = 8  # `v1=` entries in one header: a rotation needs two
MAX_HEADER_CHARS: Final = 1024
FORMAT: Final = "t=<unix seconds>,v1=<hex HMAC-SHA256>"

# fullmatch, never match(...$). No leading zero: `t` is signed as sent, so one time has one
# spelling. Twelve digits reach the year 33658.
_TIME = re.compile(r"0|[1-9][0-9]{0,11}")
_HEX = re.compile(r"[0-9A-Fa-f]{64}")


class SignatureError(ValueError):
    """A signature header that is missing, malformed, stale or does not match; the message
    says which, for the caller's logs (the internal API answers it 401 `bad_signature`)."""


@dataclass(frozen=True, slots=True)
class SignatureHeader:
    """A parsed header: the time it claims and its `v1` digests, lower-cased."""

    t: int
    v1: tuple[str, ...]


def signed_payload(t: int, method: str, path: str, body: bytes) -> bytes:
    """What `v1` signs: t, the method, the path as sent (query string included) and the raw
    body, joined by LF. The body is bytes, exactly as sent: re-encoding JSON changes it."""
    if t < 0:
        raise ValueError("t must be unix seconds, not negative")
    if not path.startswith("/"):
        raise ValueError(f"path must be the request line's, starting with /: {path!r}")
    return f"{t}\n{method.upper()}\n{path}\n".encode() + body


def signature(secret: str, t: int, method: str, path: str, body: bytes) -> str:
    """The lower-case hex `v1` of one request."""
    payload = signed_payload(t, method, path, body)
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def sign_request(secret: str, method: str, path: str, body: bytes, t: int) -> str:
    """The `X-Giftstream-Signature` value a caller sends: `t=<t>,v1=<hex>`. `t` is now in
    unix seconds (the caller's clock); `path` includes the query string, if any."""
    return f"t={t},v1={signature(secret, t, method, path, body)}"


def parse_signature_header(value: str | None) -> SignatureHeader:
    """The header's fields, or SignatureError naming what is wrong with its form: exactly
    one `t`, one to MAX_SIGNATURES `v1`, nothing else (items may have spaces around them)."""
    if not value:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header: sign as {FORMAT}")
    if len(value) > MAX_HEADER_CHARS:
        raise SignatureError(f"{SIGNATURE_HEADER} is over {MAX_HEADER_CHARS} characters")
    if not value.isascii():
        raise SignatureError(f"{SIGNATURE_HEADER} must be ASCII: {FORMAT}")
    if _HEX.fullmatch(value.strip()):
        raise SignatureError(
            f"{SIGNATURE_HEADER} holds a bare digest, the signature of revision 1, which is no "
            f"longer accepted: sign the time, method, path and body as {FORMAT}"
        )
    times: list[str] = []
    digests: list[str] = []
    for item in value.split(","):
        name, equals, text = item.strip(" \t").partition("=")
        if not equals:
            raise SignatureError(f"{SIGNATURE_HEADER}: {item.strip()!r} is not name=value")
        if name == "t":
            times.append(text)
        elif name == "v1":
            digests.append(text)
        else:
            raise SignatureError(f"{SIGNATURE_HEADER}: unknown field {name!r}; expected {FORMAT}")
    if len(times) != 1:
        raise SignatureError(f"{SIGNATURE_HEADER} must hold exactly one t=, not {len(times)}")
    if _TIME.fullmatch(times[0]) is None:
        raise SignatureError(
            f"{SIGNATURE_HEADER}: t={times[0]!r} is not unix seconds (digits, no leading zero)"
        )
    if not 1 <= len(digests) <= MAX_SIGNATURES:
        raise SignatureError(
            f"{SIGNATURE_HEADER} must hold 1 to {MAX_SIGNATURES} v1= entries, not {len(digests)}"
        )
    for digest in digests:
        if _HEX.fullmatch(digest) is None:
            raise SignatureError(f"{SIGNATURE_HEADER}: v1 must be 64 hex digits (HMAC-SHA256)")
    return SignatureHeader(int(times[0]), tuple(d.lower() for d in digests))


def verify(
    header: str | None,
    *,
    secrets: Sequence[str],
    method: str,
    path: str,
    body: bytes,
    now_s: int,
    max_skew_s: int = MAX_SKEW_S,
) -> int:
    """Which of `secrets` (the current one first, then the previous one during a rotation)
    signed this request, by index; SignatureError unless `t` is within `max_skew_s` of
    `now_s` and some `v1` matches one of them. Digests are compared in constant time."""
    if not secrets:
        raise ValueError("verify needs at least one secret")
    parsed = parse_signature_header(header)
    skew = parsed.t - now_s
    if abs(skew) > max_skew_s:
        when = "ahead of" if skew > 0 else "behind"
        raise SignatureError(
            f"{SIGNATURE_HEADER}: t={parsed.t} is {abs(skew)} s {when} the server's clock; a "
            f"signature is good for {max_skew_s} s (sign each request when sending it; is the "
            "caller's clock right?)"
        )
    for index, secret in enumerate(secrets):
        expected = signature(secret, parsed.t, method, path, body).encode()
        # Every digest is compared, so the time taken does not depend on which one matched.
        matches = [hmac.compare_digest(expected, given.encode()) for given in parsed.v1]
        if any(matches):
            return index
    raise SignatureError(
        f"{SIGNATURE_HEADER} does not match this request: v1 signs t, the method, the path "
        "with its query string and the raw body, with the webhook secret"
    )
