"""Purchases, refunds, payouts, limits and wallet views on a real Redis Cluster, through the
internal HTTP API and the Wallet: each receipt and payout key credits once whoever retries,
a replay on another user or creator is refused as on one Redis and moves nothing, a claim
whose credit never ran (a crash) is healed by the retry, and every entry lands in its
owner's partition ledger."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from redis.asyncio.cluster import RedisCluster

from giftstream.server.ledger.entries import read_entries
from giftstream.server.metrics import Metrics
from giftstream.server.money import keys
from giftstream.server.money.admin import AdminServer, build_admin_app
from giftstream.server.money.catalog import Catalog
from giftstream.server.money.claims import Claim, Claims
from giftstream.server.money.refusal import Reason, Refusal
from giftstream.server.money.wallet import Wallet
from giftstream.server.redis_cluster import cluster_client
from tests.cluster import RedisClusterProcesses
from tests.server.money.test_admin import Api, Clock, wallet_view

SECRET = "admin-test-secret-0123456789abcdef"
SPACE = keys.KeySpace(partitions=16, cluster=True)


def other_partition(user: str, *, avoid: tuple[str, ...] = ()) -> str:
    """A user id in a partition other than `user`'s (and those of `avoid`)."""
    taken = {SPACE.partition(u) for u in (user, *avoid)}
    return next(f"u{i}" for i in range(1000) if SPACE.partition(f"u{i}") not in taken)


ANN = "ann"
BOB = other_partition(ANN)
CARA = other_partition(ANN, avoid=(BOB,))
DAN = other_partition(CARA, avoid=(ANN, BOB))


@pytest.fixture
async def rc(cluster_url: str) -> AsyncIterator[RedisCluster]:
    client = cluster_client(cluster_url)
    await client.initialize()
    yield client
    await client.aclose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def money(rc: RedisCluster, catalog: Catalog, clock: Clock) -> Wallet:
    wallet = Wallet(
        rc,
        catalog.economics,
        keyspace=SPACE,
        clock=clock,
        payout_hold_days=0,
    )
    await wallet.load_scripts()
    return wallet


@pytest.fixture
async def api(
    money: Wallet, catalog: Catalog, rc: RedisCluster, clock: Clock
) -> AsyncIterator[Api]:
    app = build_admin_app(
        wallet=money,
        catalog=catalog,
        redis=rc,
        webhook_secret=SECRET,
        metrics=Metrics(),
        clock=clock,
    )
    async with AdminServer(app, "127.0.0.1", 0) as server, aiohttp.ClientSession() as http:
        yield Api(http, server.url, clock)


async def kinds(rc: RedisCluster, ledger: str) -> list[tuple[str, str]]:
    """(kind, user or creator) of each entry of one partition's ledger."""
    return [
        (e.data["kind"], e.data.get("user") or e.data["creator"])
        async for e in read_entries(rc, ledger)
    ]


async def give_diamonds(rc: RedisCluster, creator: str, diamonds: int) -> None:
    """Diamonds as a credited gift leaves them (crediting is helper A's, not tested here)."""
    await rc.hset(SPACE.wallet(creator), "diamonds", diamonds)


def test_claim_and_record_names() -> None:
    """One Redis keeps today's record names; a cluster puts the record in its owner's
    partition and the claim in the id's own."""
    assert (
        keys.SINGLE.receipt("RC", owner="ann")
        == keys.SINGLE.receipt("RC")
        == ("giftstream:receipt:RC")
    )
    assert keys.SINGLE.payout("PK", owner="cara") == "giftstream:payout:PK"
    p = SPACE.partition("ann")
    assert SPACE.receipt("RC", owner="ann") == f"giftstream:{{p{p:02d}}}:receipt:RC"
    assert SPACE.payout("PK", owner="ann") == f"giftstream:{{p{p:02d}}}:payout:PK"
    assert (
        SPACE.receipt_claim("RC") == f"giftstream:{{p{SPACE.partition('RC'):02d}}}:receipt_claim:RC"
    )
    assert (
        SPACE.payout_claim("PK") == f"giftstream:{{p{SPACE.partition('PK'):02d}}}:payout_claim:PK"
    )
    with pytest.raises(ValueError, match="owner"):
        SPACE.receipt("RC")


# ---- purchases ---------------------------------------------------------------------------


async def test_purchase_credits_once_per_receipt(api: Api, rc: RedisCluster) -> None:
    first = await api.buy(ANN, "coins_350", "rc-cluster-0001")
    assert first == {"coins": 350, "credited": True}
    assert await api.buy(ANN, "coins_350", "rc-cluster-0001") == {"coins": 350, "credited": False}
    assert await kinds(rc, SPACE.ledger_of(ANN)) == [("purchase", ANN)]
    claim = await rc.hgetall(SPACE.receipt_claim("rc-cluster-0001"))
    assert claim[b"owner"] == ANN.encode() and claim[b"params"] == b"coins_350"
    assert await rc.hget(SPACE.receipt("rc-cluster-0001", owner=ANN), "user") == ANN.encode()


async def test_concurrent_retries_credit_once(money: Wallet, catalog: Catalog) -> None:
    package = catalog.packages["coins_70"]
    results = await asyncio.gather(
        *(
            money.purchase(receipt="rc-cluster-many", user=ANN, package=package, adult=True)
            for _ in range(8)
        )
    )
    assert sum(r.credited for r in results) == 1
    assert {r.event for r in results} == {results[0].event}
    assert await money.balance(ANN) == (70, 0)


async def test_a_receipt_replayed_on_another_user_is_refused_and_credits_nothing(
    api: Api, rc: RedisCluster
) -> None:
    await api.buy(ANN, "coins_350", "rc-cluster-0002")
    status, body = await api.call(
        "POST", "/v1/purchases", {"receipt": "rc-cluster-0002", "user": BOB, "package": "coins_350"}
    )
    assert status == 409 and body == {
        "error": "receipt_reused",
        "message": f"receipt rc-cluster-0002 was already used for package coins_350 of user {ANN}",
    }
    status, body = await api.call(
        "POST", "/v1/purchases", {"receipt": "rc-cluster-0002", "user": ANN, "package": "coins_70"}
    )
    assert status == 409 and body["error"] == "receipt_reused"
    status, body = await api.call(
        "POST",
        "/v1/purchases",
        {"receipt": "rc-cluster-0002", "user": BOB, "package": "coins_350", "adult": False},
    )
    assert status == 409 and body["error"] == "receipt_reused"
    assert await rc.exists(SPACE.wallet(BOB), SPACE.receipt("rc-cluster-0002", owner=BOB)) == 0
    assert await kinds(rc, SPACE.ledger_of(BOB)) == []
    assert (await api.call("GET", f"/v1/wallets/{ANN}"))[1]["coins"] == 350


async def test_a_minors_purchase_claims_nothing(api: Api, rc: RedisCluster) -> None:
    status, body = await api.call(
        "POST",
        "/v1/purchases",
        {"receipt": "rc-cluster-0003", "user": ANN, "package": "coins_70", "adult": False},
    )
    assert status == 403 and body["error"] == "underage"
    assert await rc.exists(SPACE.receipt_claim("rc-cluster-0003")) == 0
    assert await api.buy(BOB, "coins_70", "rc-cluster-0003") == {"coins": 70, "credited": True}


async def test_a_claim_without_its_credit_is_healed_by_the_retry(
    money: Wallet, rc: RedisCluster, catalog: Catalog, clock: Clock
) -> None:
    """A crash between the claim and the credit: the claim alone was written."""
    claims = Claims(rc, SPACE, now=lambda: clock.now_ms)
    await claims.claim_receipt("rc-cluster-crash", ANN, "coins_700")
    await claims.claim_payout("payout-crash", CARA, 10_000)
    assert await claims.receipt("rc-cluster-crash") == Claim(ANN, "coins_700")
    assert await money.balance(ANN) == (0, 0)
    with pytest.raises(Refusal) as refused:  # the refund finds the owner, but no purchase
        await money.refund(receipt="rc-cluster-crash")
    assert refused.value.reason is Reason.UNKNOWN_RECEIPT
    package = catalog.packages["coins_700"]
    result = await money.purchase(receipt="rc-cluster-crash", user=ANN, package=package, adult=True)
    assert result.credited and result.coins == 700
    await give_diamonds(rc, CARA, 10_000)
    paid = await money.payout(creator=CARA, diamonds=10_000, key="payout-crash")
    assert not paid.replayed and paid.diamonds == 0
    assert await kinds(rc, SPACE.ledger_of(ANN)) == [("purchase", ANN)]
    assert await kinds(rc, SPACE.ledger_of(CARA)) == [("payout", CARA)]
    assert await rc.hget(SPACE.receipt_claim("rc-cluster-crash"), "retries") == b"1"


# ---- refunds -----------------------------------------------------------------------------


async def test_refund_once_with_debt(api: Api, rc: RedisCluster, money: Wallet) -> None:
    await api.buy(BOB, "coins_350", "rc-cluster-0004")
    await rc.hset(SPACE.wallet(BOB), "coins", 100)  # 250 spent meanwhile
    status, body = await api.call("POST", "/v1/refunds", {"receipt": "rc-cluster-0004"})
    assert status == 200 and body == {
        "receipt": "rc-cluster-0004",
        "user": BOB,
        "refunded": True,
        "coins_taken": 100,
        "debt_added": 250,
        "coins": 0,
        "debt": 250,
    }
    status, again = await api.call("POST", "/v1/refunds", {"receipt": "rc-cluster-0004"})
    assert status == 200 and again == {**body, "refunded": False}
    assert await kinds(rc, SPACE.ledger_of(BOB)) == [("purchase", BOB), ("refund", BOB)]
    assert await money.balance(BOB) == (0, 0)
    # the debt is paid down first by the next purchase
    assert await api.buy(BOB, "coins_350", "rc-cluster-0005") == {"coins": 100, "credited": True}
    status, unknown = await api.call("POST", "/v1/refunds", {"receipt": "rc-cluster-none"})
    assert status == 404 and unknown["error"] == "unknown_receipt"


# ---- payouts -----------------------------------------------------------------------------


async def test_payout_once_per_key_and_refused_on_another_creator(
    api: Api, rc: RedisCluster
) -> None:
    await give_diamonds(rc, CARA, 30_000)
    await give_diamonds(rc, DAN, 30_000)
    pay = {"creator": CARA, "diamonds": 10_000, "key": "payout-cluster-1"}
    status, first = await api.call("POST", "/v1/payouts", pay)
    assert status == 200 and first["cents"] == 5000 and first["diamonds"] == 20_000
    assert await api.call("POST", "/v1/payouts", pay) == (200, first)
    status, body = await api.call("POST", "/v1/payouts", {**pay, "creator": DAN})
    assert status == 409 and body == {
        "error": "key_reused",
        "message": f"payout key payout-cluster-1 was already used for 10000 diamonds of {CARA}",
    }
    status, body = await api.call("POST", "/v1/payouts", {**pay, "diamonds": 20_000})
    assert status == 409 and body["error"] == "key_reused"
    assert await kinds(rc, SPACE.ledger_of(CARA)) == [("payout", CARA)]
    assert await kinds(rc, SPACE.ledger_of(DAN)) == []
    assert await rc.hget(SPACE.payout("payout-cluster-1", owner=CARA), "creator") == CARA.encode()
    status, view = await api.call("GET", f"/v1/wallets/{DAN}")
    assert view["diamonds"] == 30_000 and view["payout_left_today"] == 2_000_000


async def test_payout_cap_and_hold_in_the_creators_partition(
    rc: RedisCluster, catalog: Catalog, clock: Clock
) -> None:
    wallet = Wallet(
        rc,
        catalog.economics,
        keyspace=SPACE,
        clock=clock,
        payout_hold_days=0,
        payout_daily_cap=15_000,
    )
    today = keys.epoch_day(clock.now_ms)
    await give_diamonds(rc, CARA, 40_000)
    await rc.hset(SPACE.held(CARA), str(today + 2), 20_000)  # half still on hold
    await wallet.payout(creator=CARA, diamonds=10_000, key="payout-cap-1")
    with pytest.raises(Refusal) as capped:
        await wallet.payout(creator=CARA, diamonds=10_000, key="payout-cap-2")
    assert capped.value.reason is Reason.PAYOUT_CAP
    clock.now_ms += keys.DAY_MS
    with pytest.raises(Refusal) as held:
        await wallet.payout(creator=CARA, diamonds=15_000, key="payout-cap-3")
    assert held.value.reason is Reason.PAYOUT_HELD
    view = await wallet.wallet(CARA)
    assert (view.diamonds, view.diamonds_held, view.diamonds_payable) == (30_000, 20_000, 10_000)
    # the key refused for its cap is bound to its params: the same request succeeds later
    paid = await wallet.payout(creator=CARA, diamonds=10_000, key="payout-cap-2")
    assert paid.diamonds == 20_000


# ---- limits and views --------------------------------------------------------------------


async def test_limits_and_view(api: Api) -> None:
    await api.buy(ANN, "coins_350", "rc-cluster-0006")
    status, view = await api.call(
        "PUT", f"/v1/wallets/{ANN}/limit", {"daily_limit": 100, "weekly_limit": 300}
    )
    assert status == 200 and view == wallet_view(ANN, coins=350, daily_limit=100, weekly_limit=300)
    status, view = await api.call("PUT", f"/v1/wallets/{ANN}/limit", {"daily_limit": None})
    assert status == 200 and view == wallet_view(ANN, coins=350, weekly_limit=300)
    assert await api.call("GET", f"/v1/wallets/{ANN}") == (200, view)
    assert await api.call("GET", f"/v1/wallets/{BOB}") == (200, wallet_view(BOB))
    status, health = await api.call("GET", "/healthz")
    assert status == 200 and health == {"ok": True, "redis": "up"}


# ---- the claim's WAIT --------------------------------------------------------------------


async def topology_lists_replicas(rc: RedisCluster, key: str, timeout_s: float = 60) -> None:
    """Until the client's topology gives the key's shard its replica: CLUSTER SLOTS lists a
    replica only once the others know its replication offset (gossip), a moment after the
    cluster is made or a replica is restarted."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while len(rc.nodes_manager.slots_cache.get(rc.keyslot(key), [])) < 2:
        assert asyncio.get_running_loop().time() < deadline, "no replica listed for the claim"
        await asyncio.sleep(0.05)
        await rc.nodes_manager.initialize()


@pytest.fixture
def stopped_replica(redis_cluster: RedisClusterProcesses) -> Iterator[list[int]]:
    """SIGSTOP/SIGCONT one replica (its pid appended by the test), resumed whatever happens."""
    stopped: list[int] = []
    yield stopped
    for node in redis_cluster.nodes:
        if node.process is not None and node.process.pid in stopped:
            node.process.send_signal(signal.SIGCONT)
    redis_cluster.wait_ok()


async def test_the_wait_runs_on_the_claims_connection(
    rc: RedisCluster, redis_cluster: RedisClusterProcesses, stopped_replica: list[int]
) -> None:
    """With the claim shard's replica stopped (still connected), a WAIT on any other
    connection would ack it at once (that connection wrote nothing); the claim's own WAIT
    cannot, so the claim is refused as unavailable. Resumed, the retry goes through."""
    claims = Claims(rc, SPACE, wait_ms=300)
    await topology_lists_replicas(rc, SPACE.receipt_claim("rc-cluster-wait"))
    node = rc.get_node_from_key(SPACE.receipt_claim("rc-cluster-wait"))
    assert node is not None
    master = next(n for n in redis_cluster.nodes if n.port == node.port)
    (replica,) = redis_cluster.replicas_of(master)
    assert replica.process is not None
    stopped_replica.append(replica.process.pid)
    replica.process.send_signal(signal.SIGSTOP)
    with pytest.raises(Refusal) as refused:
        await claims.claim_receipt("rc-cluster-wait", ANN, "coins_70")
    assert refused.value.reason is Reason.UNAVAILABLE
    replica.process.send_signal(signal.SIGCONT)
    await claims.claim_receipt("rc-cluster-wait", ANN, "coins_70")


async def test_a_claim_outlives_its_masters_failover(
    api: Api, rc: RedisCluster, redis_cluster: RedisClusterProcesses
) -> None:
    """The claim's master killed -9 and its replica promoted: the claim was WAITed onto the
    replica, so a replay on another user is still refused, and the buyer's retry credits the
    receipt once in all (again, if the credit itself was lost with the master)."""
    receipt = "rc-cluster-failover"
    claim_key = SPACE.receipt_claim(receipt)
    await topology_lists_replicas(rc, claim_key)
    assert await api.buy(ANN, "coins_350", receipt) == {"coins": 350, "credited": True}
    node = rc.get_node_from_key(claim_key)
    assert node is not None
    master = next(n for n in redis_cluster.nodes if n.port == node.port)
    killed, _ = redis_cluster.kill_master(master)
    try:
        status, body = await api.call(
            "POST", "/v1/purchases", {"receipt": receipt, "user": BOB, "package": "coins_350"}
        )
        assert status == 409 and body["error"] == "receipt_reused"
        status, again = await api.call(
            "POST", "/v1/purchases", {"receipt": receipt, "user": ANN, "package": "coins_350"}
        )
        assert status == 200 and again["coins"] == 350
        assert await kinds(rc, SPACE.ledger_of(ANN)) == [("purchase", ANN)]
        assert await kinds(rc, SPACE.ledger_of(BOB)) == []
    finally:
        redis_cluster.restart(killed)
        redis_cluster.wait_ok()
