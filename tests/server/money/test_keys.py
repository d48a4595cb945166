"""KeySpace names every money and room key: on one Redis exactly the names data already has
(a rename would strand every balance), on a cluster one hash-tagged slot per user's partition."""

from __future__ import annotations

import ast
import re
import zlib
from pathlib import Path

import pytest
from redis.crc import key_slot

from giftstream.server.money import keys
from giftstream.server.money.keys import KeySpace

CLUSTER = KeySpace(partitions=16, cluster=True)


def test_one_redis_keeps_todays_names() -> None:
    space = keys.SINGLE
    assert space.wallet("ann") == "giftstream:wallet:ann"
    assert space.gift_key("ann", "IK") == "giftstream:gift_key:ann:IK"
    assert space.combo("ann", "cara") == "giftstream:combo:ann/cara"
    assert space.held("cara") == "giftstream:held:cara"
    assert space.receipt("RC") == "giftstream:receipt:RC"
    assert space.payout("PK") == "giftstream:payout:PK"
    assert space.ledger() == "giftstream:ledger" and space.ledgers() == ["giftstream:ledger"]
    assert space.earnings("cara") == "giftstream:earnings:{cara}"
    assert space.earnings_seen("cara", "2025-11-24") == "giftstream:earnings_seen:{cara}:2025-11-24"
    assert space.room("cara") == "giftstream:room:cara"
    assert space.room_log("cara") == "giftstream:room:cara:log"
    assert space.room_presence("cara") == "giftstream:room:cara:presence"
    assert space.wallet_match == "giftstream:wallet:*"
    assert KeySpace(ledger_key="test:ledger").ledger() == "test:ledger"
    assert space.live_rooms_of("cara") == space.live_rooms_of("dan") == "giftstream:rooms:live"
    assert space.all_live_rooms() == ["giftstream:rooms:live"] == [keys.LIVE_ROOMS]


def test_partition_is_crc32_mod_p_and_stable() -> None:
    # Documented and fixed for the data's life: a change would move every wallet.
    assert CLUSTER.partition("ann") == zlib.crc32(b"ann") % 16 == 3
    assert keys.SINGLE.partition("ann") == 0
    assert {CLUSTER.partition(f"u{i}") for i in range(400)} == set(range(16))


def test_a_users_keys_share_one_slot_on_a_cluster() -> None:
    p = CLUSTER.partition("ann")
    names = [
        CLUSTER.wallet("ann"),
        CLUSTER.gift_key("ann", "IK:x"),
        CLUSTER.combo("ann", "cara"),
        CLUSTER.held("ann"),
        CLUSTER.ledger(p),
        CLUSTER.room("ann"),
        CLUSTER.room_log("ann"),
        CLUSTER.room_presence("ann"),
        CLUSTER.earnings("ann"),
        CLUSTER.earnings_seen("ann", "2025-11-24"),
        CLUSTER.board_session("ann"),
        CLUSTER.board_week_prefix("ann"),
        CLUSTER.board_week("ann", 20416),
        CLUSTER.board_names("ann"),
        CLUSTER.board_creators_day(p, 20416),
        CLUSTER.board_creator_names(p),
    ]
    assert CLUSTER.wallet("ann") == "giftstream:{p03}:wallet:ann"
    assert CLUSTER.board_week("ann", 20416) == "giftstream:{p03}:board:week:ann:20416"
    assert keys.SINGLE.board_session("cara") == "giftstream:board:session:cara"
    assert keys.SINGLE.board_creators_day(0, 20416) == "giftstream:board:creators_day:20416"
    assert CLUSTER.ledger(p) == "giftstream:{p03}:ledger"
    assert {key_slot(name.encode()) for name in names} == {key_slot(b"{p03}")}
    other = next(f"u{i}" for i in range(100) if CLUSTER.partition(f"u{i}") != p)
    assert key_slot(CLUSTER.wallet(other).encode()) != key_slot(b"{p03}")


def test_wallet_names_read_back_to_their_user() -> None:
    for space in (keys.SINGLE, CLUSTER):
        for user in ("ann", "a:b.c-d_9", "x" * 64):
            assert space.user_of_wallet(space.wallet(user)) == user


def test_ledgers_one_per_partition() -> None:
    ledgers = CLUSTER.ledgers()
    assert len(set(ledgers)) == 16 and ledgers[7] == "giftstream:{p07}:ledger"
    custom = KeySpace(ledger_key="giftstream:money", partitions=2, cluster=True)
    assert custom.ledgers() == ["giftstream:{p00}:money", "giftstream:{p01}:money"]


def test_live_rooms_one_set_per_partition_on_a_cluster() -> None:
    """A room's live set is its creator's partition's, so the room scripts (room_open,
    room_publish) and the memory broker's end touch one slot; readers take every set."""
    sets = CLUSTER.all_live_rooms()
    assert len(set(sets)) == 16 and sets[7] == "giftstream:{p07}:rooms:live"
    assert CLUSTER.live_rooms_of("ann") == "giftstream:{p03}:rooms:live" == sets[3]
    for room in ("ann", "cara", "a:b.c-d_9", *(f"u{i}" for i in range(50))):
        live_set = CLUSTER.live_rooms_of(room)
        assert live_set == sets[CLUSTER.partition(room)]
        room_keys = [CLUSTER.room(room), CLUSTER.room_log(room), CLUSTER.room_presence(room)]
        assert {key_slot(k.encode()) for k in room_keys} == {key_slot(live_set.encode())}
    assert len({key_slot(k.encode()) for k in sets}) == 16  # one slot each


@pytest.mark.parametrize(
    ("partitions", "cluster"), [(0, True), (keys.MAX_PARTITIONS + 1, True), (2, False)]
)
def test_bad_partition_counts_are_refused(partitions: int, cluster: bool) -> None:
    with pytest.raises(ValueError, match="partition"):
        KeySpace(partitions=partitions, cluster=cluster)


# ---- no module names a key by hand ------------------------------------------------------

REPO = Path(__file__).resolve().parents[3]
KEYS_PY = REPO / "server" / "money" / "keys.py"
KEY_LITERAL = re.compile(r"giftstream:\S")  # a key name; "giftstream: error: ..." is a message
LUA_KEY_LITERAL = re.compile(r"""['"]giftstream:\S""")


def hand_made_keys(source: str) -> list[str]:
    """Where Python source names a key outside keys.py: a string literal (or an f-string's
    text) beginning `giftstream:` and a use of keys.PREFIX. Docstrings are prose, not keys.
    Nothing else needs allowing: metric names begin `giftstream_`, NATS subjects
    `giftstream.`, and error messages `giftstream: ` (a space after the colon)."""
    tree = ast.parse(source)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings and KEY_LITERAL.match(node.value):
                found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr == "PREFIX":
            if isinstance(node.value, ast.Name) and node.value.id == "keys":
                found.append(f"line {node.lineno}: keys.PREFIX")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").endswith("money.keys"):
            if any(alias.name == "PREFIX" for alias in node.names):
                found.append(f"line {node.lineno}: imports PREFIX")
    return found


def test_the_scan_finds_hand_made_keys() -> None:
    """The scan below can fail: each way of building a key by hand is caught."""
    source = """
\"\"\"Docstring naming giftstream:ledger is prose.\"\"\"
from giftstream.server.money import keys
from giftstream.server.money.keys import PREFIX
LIVE = "giftstream:rooms:live"
def lease(ledger: str) -> str:
    return f"giftstream:relay:lease:{ledger}" + keys.PREFIX
MESSAGE = "giftstream: error: no"
METRIC = "giftstream_connections"
"""
    assert sorted(hand_made_keys(source)) == [
        "line 4: imports PREFIX",
        "line 5: 'giftstream:rooms:live'",
        "line 7: 'giftstream:relay:lease:'",
        "line 7: keys.PREFIX",
    ]
    assert LUA_KEY_LITERAL.search("redis.call('GET', 'giftstream:wallet:' .. u)")
    assert not LUA_KEY_LITERAL.search("error('giftstream: bad ' .. KEYS[1])")


def test_no_module_names_a_key_outside_keys_py() -> None:
    """Every money, room and ledger key is named in server/money/keys.py (issue 14: on a
    cluster one naming must pick each key's slot), never by hand in server/ or loadtest/;
    the Lua scripts are given every key (KEYS), never build one."""
    found = []
    for folder in ("server", "loadtest"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path != KEYS_PY:
                where = path.relative_to(REPO)
                found += [f"{where} {hit}" for hit in hand_made_keys(path.read_text())]
    lua = sorted((REPO / "server" / "lua").glob("*.lua"))
    assert lua  # the scan reads the scripts where they are
    for path in lua:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if LUA_KEY_LITERAL.search(line):
                found.append(f"{path.relative_to(REPO)} line {number}: {line.strip()}")
    assert found == []
