"""Connection caps: how many sockets the node, one client address and one user may hold.

Sockets count from accept to close, whether or not they ever say hello, so a few addresses
cannot hold the node with silent sockets. Past the node's cap or the address's, the upgrade
is refused over HTTP (503, 429) before any WebSocket exists; a user's connections count
from a good hello, and the hello past that cap is closed 4429. Counts only, no I/O: the
gateway and the sessions report each socket's and each hello's start and end.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from http import HTTPStatus

from giftstream.server.config import Limits


class CapReason(StrEnum):
    """Why a connection was refused: the label of `giftstream_connections_refused_total`."""

    SERVER_FULL = "server_full"
    IP_CAP = "ip_cap"
    USER_CAP = "user_cap"


# The HTTP answer to an upgrade refused by a cap (the user's cap closes 4429 at hello).
UPGRADE_STATUS = {
    CapReason.SERVER_FULL: HTTPStatus.SERVICE_UNAVAILABLE,
    CapReason.IP_CAP: HTTPStatus.TOO_MANY_REQUESTS,
}


def address_key(host: str) -> str:
    """What one client address is for the cap: an IPv4 address as it is; an IPv6 one by its
    /64, since one subscriber is handed a whole /64 and could take a new address per socket."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # fe80::1%eth0: no zone
    except ValueError:
        return host  # not an IP (a Unix socket): counted as it is
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ConnectionCaps:
    """The node's counts of sockets (in all and by address) and of users' connections."""

    __slots__ = ("_by_ip", "_by_user", "max_per_ip", "max_per_user", "max_total", "sockets")

    def __init__(self, limits: Limits) -> None:
        self.max_total = limits.max_connections
        self.max_per_ip = limits.max_connections_per_ip  # 0: no cap
        self.max_per_user = limits.max_connections_per_user  # 0: no cap
        self.sockets = 0
        self._by_ip: dict[str, int] = {}
        self._by_user: dict[str, int] = {}

    # ---- sockets, from accept to close ---------------------------------------------------

    def socket_opened(self, ip: str) -> None:
        self.sockets += 1
        self._by_ip[ip] = self._by_ip.get(ip, 0) + 1

    def socket_closed(self, ip: str) -> None:
        self.sockets -= 1
        left = self._by_ip[ip] - 1
        if left:
            self._by_ip[ip] = left
        else:
            del self._by_ip[ip]

    def upgrade_refusal(self, ip: str) -> CapReason | None:
        """Whether a socket already counted may become a WebSocket: None when it may."""
        if self.sockets > self.max_total:
            return CapReason.SERVER_FULL
        if self.max_per_ip and self._by_ip.get(ip, 0) > self.max_per_ip:
            return CapReason.IP_CAP
        return None

    def sockets_of(self, ip: str) -> int:
        return self._by_ip.get(ip, 0)

    # ---- users, from a good hello to close -----------------------------------------------

    def admit_user(self, user: str) -> bool:
        """Count one more connection of `user`; False (nothing counted) past the cap."""
        held = self._by_user.get(user, 0)
        if self.max_per_user and held >= self.max_per_user:
            return False
        self._by_user[user] = held + 1
        return True

    def user_left(self, user: str) -> None:
        left = self._by_user[user] - 1
        if left:
            self._by_user[user] = left
        else:
            del self._by_user[user]

    def connections_of(self, user: str) -> int:
        return self._by_user.get(user, 0)
