"""The gateway registry: each gateway's heartbeat in Redis, and what the live ones sum to.

Every gateway process writes its counters into the `giftstream:gateways` hash once a stats
interval (a turn of the ops loop, server/realtime/ops.py), under its gateway id, stamped
with Redis's clock; the ops feed's `stats` line is the sum over the heartbeats younger than
the expiry, so a gateway killed without a word drops out of it within the expiry, and a
gateway that stops cleanly at once.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeGuard

import orjson
from redis.exceptions import NoScriptError

from giftstream.server.money import keys
from giftstream.server.redis_cluster import RedisClient
from giftstream.server.scripts import load, register

GATEWAYS_KEY = keys.GATEWAYS
DEFAULT_EXPIRY_S = 15.0  # a gateway silent this long is gone (PROTOCOL.md 6: within 15 s)
MAX_COUNTER = 2**53 - 1  # what a Lua number and a JSON reader both hold exactly
_REFUSAL_CODE = re.compile(r"[a-z_]{1,32}")  # fullmatch; the heartbeat script's pattern too


def new_gateway_id() -> str:
    """A gateway's id for its heartbeat (and presence) fields: random, so a restarted process
    is a new gateway and never inherits a dead one's counters."""
    return uuid.uuid4().hex[:12]


Refusals = tuple[tuple[str, int], ...]  # (error code, count) pairs, codes sorted


class Counters(NamedTuple):
    """What a gateway reports: open connections now, gifts and coins settled since it started,
    and the error replies it sent since it started, by code."""

    connections: int
    gifts: int
    coins: int
    refusals: Refusals = ()


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One gateway's counters as it last wrote them, `ts` in ms of Redis's clock."""

    connections: int
    gifts: int
    coins: int
    ts: int
    refusals: Refusals = ()

    @classmethod
    def parse(cls, raw: bytes | str) -> Heartbeat | None:
        """The heartbeat in a hash field's value; None for anything else (it is skipped).
        `refusals` is optional (a gateway of an older release writes none)."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict):
            return None
        values: list[int] = []
        for name in ("connections", "gifts", "coins", "ts"):
            value = data.get(name)
            if not _is_counter(value):
                return None
            values.append(value)
        connections, gifts, coins, ts = values
        refusals = data.get("refusals", {})
        if not isinstance(refusals, dict) or not all(
            is_refusal_code(code) and _is_counter(count) for code, count in refusals.items()
        ):
            return None
        return cls(
            connections=connections,
            gifts=gifts,
            coins=coins,
            ts=ts,
            refusals=tuple(sorted(refusals.items())),
        )


def _is_counter(value: object) -> TypeGuard[int]:
    return type(value) is int and 0 <= value <= MAX_COUNTER  # no bool, no float


def is_refusal_code(code: object) -> bool:
    """An error code as a heartbeat may carry it (the heartbeat script checks the same)."""
    return isinstance(code, str) and _REFUSAL_CODE.fullmatch(code) is not None


@dataclass(frozen=True, slots=True)
class Survey:
    """One reading of the service: Redis's time, its live rooms and every live heartbeat."""

    now_ms: int
    rooms: int
    beats: Mapping[str, Heartbeat]


@dataclass(frozen=True, slots=True)
class ServiceFigures:
    """The numbers of one `stats` line, for the whole service."""

    ts: int
    rooms: int
    connections: int
    gifts_per_s: float
    coins_per_s: float
    refusals: Refusals = ()


class ServiceMeter:
    """Turns successive surveys into service-wide figures: connections summed, and each
    gateway's gift and coin rates, taken between its last two distinct heartbeats, summed.

    Rates are per gateway and between its own heartbeats, not of the sum between readings:
    a gateway that appears or disappears is never a burst or a dip, a reading that falls
    between two heartbeats never shows 0, and every gateway that reads the same heartbeats
    computes the same figures. A gateway's rate is 0 until its second heartbeat."""

    def __init__(self) -> None:
        self._last: dict[str, Heartbeat] = {}
        self._rates: dict[str, tuple[float, float]] = {}

    def reset(self) -> None:
        """Forget every gateway (no one watches: the next rates start afresh)."""
        self._last.clear()
        self._rates.clear()

    def update(self, survey: Survey) -> ServiceFigures:
        for gone in self._last.keys() - survey.beats.keys():
            del self._last[gone]
            self._rates.pop(gone, None)
        for gateway, beat in survey.beats.items():
            before = self._last.get(gateway)
            if before is None:
                self._last[gateway] = beat
            elif beat.ts > before.ts:
                elapsed_s = (beat.ts - before.ts) / 1000
                self._rates[gateway] = (
                    max(beat.gifts - before.gifts, 0) / elapsed_s,
                    max(beat.coins - before.coins, 0) / elapsed_s,
                )
                self._last[gateway] = beat
        return ServiceFigures(
            ts=survey.now_ms,
            rooms=survey.rooms,
            connections=sum(beat.connections for beat in survey.beats.values()),
            gifts_per_s=round(sum(gifts for gifts, _ in self._rates.values()), 2),
            coins_per_s=round(sum(coins for _, coins in self._rates.values()), 2),
            refusals=_summed(beat.refusals for beat in survey.beats.values()),
        )


def _summed(each: Iterable[Refusals]) -> Refusals:
    """Refusal counts of several gateways, summed by code."""
    totals: dict[str, int] = {}
    for refusals in each:
        for code, count in refusals:
            totals[code] = totals.get(code, 0) + count
    return tuple(sorted(totals.items()))


class GatewayRegistry:
    """This gateway's heartbeat in `giftstream:gateways`, and readings of all of them.

    `counters` is asked at each heartbeat; `live_rooms_keys` are the sets of live rooms (the
    hub's, one per partition), counted outside the scripts as they may be in other slots. Both
    scripts take Redis's TIME, so the age of a
    heartbeat is judged by one clock however skewed the gateways' own are."""

    def __init__(
        self,
        redis: RedisClient,
        gateway_id: str,
        counters: Callable[[], Counters],
        live_rooms_keys: Sequence[str],
        expiry_s: float = DEFAULT_EXPIRY_S,
    ) -> None:
        self.redis = redis
        if isinstance(live_rooms_keys, str):
            raise TypeError("live_rooms_keys: a list of keys, not one key's name")
        self.live_rooms_keys = list(live_rooms_keys)
        self.gateway_id = gateway_id
        self.counters = counters
        self.expiry_ms = max(1, round(expiry_s * 1000))
        self._heartbeat = register(redis, "gateway_heartbeat")
        self._survey = register(redis, "gateway_survey")

    async def beat(self) -> None:
        """Write this gateway's counters, stamped with Redis's time."""
        await self._heartbeat(keys=[GATEWAYS_KEY], args=self._heartbeat_args())

    def _heartbeat_args(self) -> list[str | int]:
        """The heartbeat script's ARGV: id, connections, gifts, coins, then code, count, ..."""
        connections, gifts, coins, refusals = self.counters()
        args: list[str | int] = [self.gateway_id, connections, gifts, coins]
        for code, count in refusals:
            args += [code, count]
        return args

    async def survey(self) -> Survey:
        """Write this gateway's heartbeat, then read every live gateway's and the number of
        live rooms, in one round trip (so the reader's own share is never an interval old);
        heartbeats past the expiry (a killed gateway) or unreadable are deleted, left out."""
        try:
            return await self._survey_once()
        except NoScriptError:  # not loaded yet, or lost (a restart, a cluster's failover)
            await load(self.redis, self._heartbeat, self._survey)
            return await self._survey_once()

    async def _survey_once(self) -> Survey:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.evalsha(self._heartbeat.sha, 1, GATEWAYS_KEY, *self._heartbeat_args())
            pipe.evalsha(self._survey.sha, 1, GATEWAYS_KEY, self.expiry_ms)
            for live_set in self.live_rooms_keys:
                pipe.scard(live_set)
            _, reply, *live_counts = await pipe.execute()
        now_ms, *fields = reply
        beats: dict[str, Heartbeat] = {}
        for gateway, raw in zip(fields[::2], fields[1::2], strict=True):
            beat = Heartbeat.parse(raw)
            if beat is not None:
                beats[keys.text(gateway)] = beat
        return Survey(now_ms=int(now_ms), rooms=sum(int(n) for n in live_counts), beats=beats)

    async def remove(self) -> None:
        """Take this gateway out at once (a clean stop), not after the expiry."""
        await self.redis.hdel(GATEWAYS_KEY, self.gateway_id)
