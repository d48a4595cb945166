"""The plan: Zipf-skewed rooms, cheap-weighted gift mix, coins enough for the run, and a
split over workers that keeps every viewer exactly once."""

from __future__ import annotations

from collections import Counter

from giftstream.loadtest.plan import GiftMix, make_plan, zipf_weights
from giftstream.loadtest.scenario import build
from giftstream.server.money.catalog import load_catalog

CATALOG = load_catalog().as_wire()


def test_rooms_are_zipf_skewed() -> None:
    s = build({}, {"viewers": 5000, "rooms": 10, "gifters": 100, "seed": 3})
    plan = make_plan(s, CATALOG, "ltabc123")
    counts = sorted(plan.room_viewers.values(), reverse=True)
    weights = zipf_weights(10, 1.1)
    assert counts[0] > 3 * counts[4] > 0  # the top room is far more popular than the fifth
    expected_top = 5000 * weights[0] / sum(weights)
    assert abs(plan.room_viewers["ltabc123-c0"] - expected_top) < 0.15 * expected_top


def test_gift_mix_favours_cheap_gifts() -> None:
    mix = GiftMix.from_catalog(CATALOG)
    share = {g.id: w / sum(mix.weights) for g, w in zip(mix.gifts, mix.weights, strict=True)}
    assert share["rose"] > 0.5 > share["heart"] > share["lion"]
    assert mix.cheapest.id == "rose"
    assert 5 < mix.mean_cost < 50


def test_roles_are_disjoint_and_each_viewer_is_in_one_worker() -> None:
    s = build(
        {},
        {
            "viewers": 400,
            "rooms": 5,
            "gifters": 40,
            "slow_readers": 0.1,
            "reconnect_storm": "0.5@3",
            "duration": 10,
            "workers": 3,
        },
    )
    plan = make_plan(s, CATALOG, "ltabc123")
    gifters = [c for c in plan.clients if c.gifter >= 0]
    slow = [c for c in plan.clients if c.slow]
    storm = [c for c in plan.clients if c.storm_delay is not None]
    assert len(gifters) == 40 and sorted(c.gifter for c in gifters) == list(range(40))
    assert len(slow) == 36 and not any(c.gifter >= 0 for c in slow)
    assert len(storm) == 182 and not any(c.slow for c in storm)  # half of the 364 readers
    assert all(0 <= c.storm_delay <= 2.0 for c in storm if c.storm_delay is not None)
    assert all(0 <= c.phase < 10 / 4 for c in gifters)  # within one interval of the start
    parts = [plan.for_worker(i, 3, s, "secret").clients for i in range(3)]
    users = Counter(c.user for part in parts for c in part)
    assert len(users) == 400 and set(users.values()) == {1}
    assert all(abs(len(p) - 400 / 3) <= 1 for p in parts)


def test_the_same_seed_makes_the_same_plan() -> None:
    s = build({}, {"viewers": 100, "rooms": 4, "gifters": 10, "seed": 7})
    first = make_plan(s, CATALOG, "lt000001").clients
    assert make_plan(s, CATALOG, "lt000001").clients == first
    other = build({}, {"viewers": 100, "rooms": 4, "gifters": 10, "seed": 8})
    assert make_plan(other, CATALOG, "lt000001").clients != first


def test_gifters_are_funded_for_the_whole_run() -> None:
    s = build({}, {"viewers": 100, "gifters": 10, "gift_rate": 150, "duration": 60})
    plan = make_plan(s, CATALOG, "lt000001")
    needed = 15 * 60 * GiftMix.from_catalog(CATALOG).mean_cost
    assert plan.coins_per_gifter >= 1.5 * needed
    assert plan.coins_per_gifter == plan.purchases_per_gifter * plan.package["coins"]
