"""The caps' counting rules without sockets (the wiring is in tests/security)."""

from __future__ import annotations

import pytest

from giftstream.server.config import Limits
from giftstream.server.realtime.caps import CapReason, ConnectionCaps, address_key


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),  # a dual-stack socket's IPv4 client
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # same subscriber, new address
        ("fe80::1%eth0", "fe80::/64"),
        ("", ""),
    ],
)
def test_an_ipv6_client_counts_by_its_64(host: str, key: str) -> None:
    assert address_key(host) == key


def test_counts_refuse_past_each_cap_and_free_on_close() -> None:
    caps = ConnectionCaps(
        Limits(max_connections=3, max_connections_per_ip=2, max_connections_per_user=1)
    )
    for ip in ("a", "a", "b"):
        caps.socket_opened(ip)
        assert caps.upgrade_refusal(ip) is None
    caps.socket_opened("a")
    assert caps.upgrade_refusal("a") is CapReason.SERVER_FULL  # the node's cap comes first
    caps.socket_closed("b")
    assert caps.upgrade_refusal("a") is CapReason.IP_CAP
    caps.socket_closed("a")
    assert (caps.sockets, caps.sockets_of("a"), caps.sockets_of("b")) == (2, 2, 0)
    assert caps.admit_user("ann") and not caps.admit_user("ann") and caps.admit_user("bob")
    caps.user_left("ann")
    assert caps.connections_of("ann") == 0 and caps.admit_user("ann")


def test_zero_means_no_cap_per_address_or_user() -> None:
    caps = ConnectionCaps(
        Limits(max_connections=100, max_connections_per_ip=0, max_connections_per_user=0)
    )
    for _ in range(50):
        caps.socket_opened("a")
        assert caps.admit_user("ann")
    assert caps.upgrade_refusal("a") is None
