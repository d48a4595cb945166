"""The r2 signature as a pure rule: what it binds, its time window, its strict header form."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from giftstream.protocol.signing import (
    MAX_SIGNATURES,
    MAX_SKEW_S,
    SignatureError,
    parse_signature_header,
    sign_request,
    verify,
)

SECRET = "signing-test-secret-0123456789"
OLD = "signing-old-secret-0123456789ab"
T = 1_764_000_000
BODY = b'{"receipt":"receipt-0001","user":"ann","package":"coins_70"}'


def check(header: str | None, **changes: object) -> int:
    request: dict[str, object] = {
        "secrets": (SECRET,),
        "method": "POST",
        "path": "/v1/purchases",
        "body": BODY,
        "now_s": T,
    }
    return verify(header, **{**request, **changes})  # type: ignore[arg-type]


def test_a_signature_verifies_for_its_own_request() -> None:
    assert check(sign_request(SECRET, "POST", "/v1/purchases", BODY, T)) == 0


def test_it_is_the_documented_hmac() -> None:
    text = f"{T}\nPOST\n/v1/purchases\n".encode() + BODY
    digest = hmac.new(SECRET.encode(), text, hashlib.sha256).hexdigest()
    assert sign_request(SECRET, "POST", "/v1/purchases", BODY, T) == f"t={T},v1={digest}"


@pytest.mark.parametrize(
    "changed",
    [
        {"method": "PUT"},
        {"path": "/v1/refunds"},
        {"path": "/v1/purchases?x=1"},
        {"body": BODY + b"\n"},
        {"body": b""},
        {"secrets": (OLD,)},
    ],
    ids=str,
)
def test_it_binds_method_path_query_body_and_secret(changed: dict[str, object]) -> None:
    header = sign_request(SECRET, "POST", "/v1/purchases", BODY, T)
    with pytest.raises(SignatureError, match="does not match"):
        check(header, **changed)


@pytest.mark.parametrize("skew", [-MAX_SKEW_S, -1, 0, 1, MAX_SKEW_S])
def test_t_within_the_window_passes(skew: int) -> None:
    assert check(sign_request(SECRET, "POST", "/v1/purchases", BODY, T + skew)) == 0


@pytest.mark.parametrize(("skew", "word"), [(-MAX_SKEW_S - 1, "behind"), (MAX_SKEW_S + 1, "ahead")])
def test_t_outside_the_window_fails(skew: int, word: str) -> None:
    header = sign_request(SECRET, "POST", "/v1/purchases", BODY, T + skew)
    with pytest.raises(SignatureError, match=f"301 s {word}"):
        check(header)


def test_the_previous_secret_counts_only_when_given() -> None:
    header = sign_request(OLD, "POST", "/v1/purchases", BODY, T)
    assert check(header, secrets=(SECRET, OLD)) == 1
    with pytest.raises(SignatureError):
        check(header)


def test_any_of_several_v1_may_match() -> None:
    new = sign_request(SECRET, "POST", "/v1/purchases", BODY, T)
    old = sign_request(OLD, "POST", "/v1/purchases", BODY, T).partition(",")[2]
    assert check(f"{new}, {old}") == 0
    assert check(f"t={T},{old},{new.partition(',')[2]}") == 0
    with pytest.raises(SignatureError):
        check(f"t={T},{old}")


def test_revision_1_is_refused_by_name() -> None:
    revision_1 = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()
    with pytest.raises(SignatureError, match="revision 1"):
        check(revision_1)


DIGEST = "a" * 64
MALFORMED = [
    None,
    "",
    f"v1={DIGEST}",
    f"t={T}",
    f"t={T},v1=",
    f"t={T},v1={DIGEST[:-1]}",
    f"t={T},v1={DIGEST}0",
    f"t={T},v1=g{DIGEST[1:]}",
    f"t={T},t={T},v1={DIGEST}",
    f"t=-{T},v1={DIGEST}",
    f"t=+{T},v1={DIGEST}",
    f"t=0{T},v1={DIGEST}",
    f"t={T}.5,v1={DIGEST}",
    f"t=1e9,v1={DIGEST}",
    f"t=１７６４,v1={DIGEST}",  # noqa: RUF001  (full-width digits: isdigit() says yes)
    f"t=1234567890123,v1={DIGEST}",
    f"t={T},v0={DIGEST}",
    f"t={T};v1={DIGEST}",
    f"t={T},v1={DIGEST},",
    f"t={T} v1={DIGEST}",
    ",,,",
    "=",
    f"t={T}," + ",".join([f"v1={DIGEST}"] * (MAX_SIGNATURES + 1)),
    f"t={T},v1={DIGEST}," + "x" * 2000,
    f"t={T},v1=é{DIGEST[1:]}",
]


@pytest.mark.parametrize("header", MALFORMED)
def test_malformed_headers_fail_with_a_signature_error(header: str | None) -> None:
    with pytest.raises(SignatureError) as refused:
        check(header)
    assert "X-Giftstream-Signature" in str(refused.value)


@given(st.text(max_size=300))
def test_any_text_is_parsed_or_refused_never_crashes(text: str) -> None:
    try:
        parsed = parse_signature_header(text)
    except SignatureError:
        return
    assert parsed.v1 and all(len(digest) == 64 for digest in parsed.v1)


@given(
    st.sampled_from(["GET", "POST", "PUT"]),
    st.from_regex(r"/v1/[a-z/]{0,20}(\?[a-z=&]{0,10})?", fullmatch=True),
    st.binary(max_size=200),
    st.integers(0, 10**11),
)
def test_round_trip(method: str, path: str, body: bytes, t: int) -> None:
    header = sign_request(SECRET, method, path, body, t)
    assert verify(header, secrets=(SECRET,), method=method, path=path, body=body, now_s=t) == 0
