"""Who does what in a run, decided up front from the scenario and the seed: users, rooms with
Zipf-skewed popularity, the gift mix, the coins each gifter needs, and each worker's share.

Pure and deterministic (given the run id), so a plan is tested without a server and two runs
with one seed put the same load on the same rooms.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from giftstream.loadtest.scenario import Scenario, ScenarioError

# How many of one gift a send carries, and how often: mostly one, sometimes a handful.
COUNTS = (1, 2, 3, 5, 10)
COUNT_WEIGHTS = (70, 12, 8, 6, 4)
BUDGET_MARGIN = 2.0  # coins bought per gifter, over what the expected spend needs
MAX_PURCHASES_PER_GIFTER = 200


@dataclass(frozen=True, slots=True)
class GiftChoice:
    id: str
    coins: int


@dataclass(frozen=True, slots=True)
class GiftMix:
    """The catalog's gifts weighted to cheap ones (weight = 1/price), as viewers really gift."""

    gifts: tuple[GiftChoice, ...]
    weights: tuple[float, ...]

    @classmethod
    def from_catalog(cls, catalog: dict[str, Any]) -> GiftMix:
        gifts = tuple(
            GiftChoice(str(g["id"]), int(g["coins"]))
            for g in catalog.get("gifts", [])
            if isinstance(g, dict) and int(g.get("coins", 0)) > 0
        )
        if not gifts:
            raise ScenarioError("the server's catalog has no gifts")
        return cls(gifts, tuple(1.0 / g.coins for g in gifts))

    @property
    def cheapest(self) -> GiftChoice:
        return min(self.gifts, key=lambda g: g.coins)

    @property
    def mean_cost(self) -> float:
        """Expected coins of one send: mean price under the weights times the mean count."""
        price = sum(g.coins * w for g, w in zip(self.gifts, self.weights, strict=True))
        price /= sum(self.weights)
        count = sum(c * w for c, w in zip(COUNTS, COUNT_WEIGHTS, strict=True)) / sum(COUNT_WEIGHTS)
        return price * count


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """One viewer connection. `gifter` is its index among gifters (-1: it only watches)."""

    user: str
    room: str
    gifter: int = -1
    slow: bool = False  # stops reading once the run starts
    storm_delay: float | None = None  # drops in the storm and rejoins this many seconds later
    phase: float = 0.0  # open loop: offset of its first gift into the run
    seed: int = 0


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """What one worker process runs; pickled to it by multiprocessing."""

    index: int
    run_id: str
    ws_url: str
    jwt_secret: str
    clients: tuple[ClientSpec, ...]
    mix: GiftMix
    duration: float
    closed_loop: bool
    interval: float  # open loop: seconds between one gifter's gifts
    think_time: float
    storm_at: float | None
    drain: float
    connect_concurrency: int
    token_ttl_s: int


@dataclass(slots=True)
class Plan:
    run_id: str
    creators: list[str]
    gifters: list[str]
    clients: list[ClientSpec]
    mix: GiftMix
    coins_per_gifter: int
    package: dict[str, Any]
    purchases_per_gifter: int
    room_viewers: dict[str, int] = field(default_factory=dict)

    def for_worker(self, index: int, workers: int, s: Scenario, jwt_secret: str) -> WorkerPlan:
        return WorkerPlan(
            index=index,
            run_id=self.run_id,
            ws_url=s.url,
            jwt_secret=jwt_secret,
            clients=tuple(self.clients[index::workers]),
            mix=self.mix,
            duration=s.duration,
            closed_loop=s.closed_loop,
            interval=1.0 / s.per_gifter_rate if s.per_gifter_rate > 0 else math.inf,
            think_time=s.think_time,
            storm_at=s.reconnect_storm.at_s if s.reconnect_storm else None,
            drain=s.drain,
            connect_concurrency=s.connect_concurrency,
            token_ttl_s=int(s.duration + 3600),
        )


def zipf_weights(n: int, s: float) -> list[float]:
    """Popularity of room k (1-based) is 1/k^s: a few rooms hold most viewers."""
    return [1.0 / (k**s) for k in range(1, n + 1)]


def expected_gifts_per_gifter(s: Scenario) -> int:
    """An upper estimate of the gifts one gifter sends in the run."""
    return math.ceil(s.duration * min(s.per_gifter_rate, 1000.0)) + 1


def make_plan(s: Scenario, catalog: dict[str, Any], run_id: str) -> Plan:
    """Users, rooms and coins for the scenario. User ids start with the run id, so a run's
    wallets, keys and receipts never meet another run's."""
    rng = random.Random(s.seed)
    mix = GiftMix.from_catalog(catalog)
    creators = [f"{run_id}-c{i}" for i in range(s.rooms)]
    weights = zipf_weights(s.rooms, s.zipf_s)
    rooms = rng.choices(creators, weights=weights, k=s.viewers)
    order = list(range(s.viewers))
    rng.shuffle(order)
    gifter_at = {v: g for g, v in enumerate(order[: s.gifters])}
    watchers = order[s.gifters :]
    slow = set(watchers[: round(s.slow_readers * len(watchers))])
    storm_delay: dict[int, float] = {}
    if s.reconnect_storm is not None:
        eligible = [v for v in range(s.viewers) if v not in slow]
        chosen = rng.sample(eligible, round(s.reconnect_storm.share * len(eligible)))
        storm_delay = {v: rng.uniform(0, s.reconnect_storm.spread_s) for v in chosen}
    interval = 1.0 / s.per_gifter_rate if s.per_gifter_rate > 0 else 0.0
    clients = [
        ClientSpec(
            user=f"{run_id}-v{v}",
            room=rooms[v],
            gifter=gifter_at.get(v, -1),
            slow=v in slow,
            storm_delay=storm_delay.get(v),
            phase=rng.uniform(0, interval) if v in gifter_at and not s.closed_loop else 0.0,
            seed=rng.getrandbits(32),
        )
        for v in range(s.viewers)
    ]
    rng.shuffle(clients)  # each worker gets a like share of gifters, slow readers, rooms
    packages = catalog.get("packages") or []
    if not packages:
        raise ScenarioError("the server's catalog has no coin packages")
    package = max(packages, key=lambda p: int(p["coins"]))
    needed = math.ceil(expected_gifts_per_gifter(s) * mix.mean_cost * BUDGET_MARGIN)
    purchases = max(1, math.ceil(needed / int(package["coins"])))
    if purchases > MAX_PURCHASES_PER_GIFTER:
        raise ScenarioError(
            f"each gifter would need {needed} coins ({purchases} purchases of the largest "
            f"package): lower gift_rate or duration, or add gifters"
        )
    room_viewers: dict[str, int] = dict.fromkeys(creators, 0)
    for room in rooms:
        room_viewers[room] += 1
    return Plan(
        run_id=run_id,
        creators=creators,
        gifters=[c.user for c in sorted(clients, key=lambda c: c.gifter) if c.gifter >= 0],
        clients=clients,
        mix=mix,
        coins_per_gifter=purchases * int(package["coins"]),
        package=package,
        purchases_per_gifter=purchases,
        room_viewers=room_viewers,
    )
