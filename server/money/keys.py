"""The Redis key layout of the money path, in one place, with how long each key is kept.

    giftstream:wallet:U              hash: coins, diamonds, debt; daily_limit, weekly_limit
                                     (absent: no limit); spent_day, spent_day_coins and
                                     spent_week, spent_week_coins (U's spend on gifts in the
                                     UTC day / ISO week stamped, as days since the epoch);
                                     payout_day, payout_day_diamonds (paid out that UTC day)
    giftstream:held:C                hash: C's diamonds still on hold, by the epoch day they
                                     become payable (due ones are dropped as they are met)
    giftstream:gift_key:U:IK         hash: a settled gift's params and first result (24 h)
    giftstream:combo:U/R             hash: U's current streak in room R (gift, combo, at)
    giftstream:receipt:RC            hash: a purchase, later its refund (kept for good)
    giftstream:payout:IK             hash: a payout and its result (kept for good)
    giftstream:receipt_claim:RC      hash, Redis Cluster only: owner (the buyer), params (the
                                     package), ts: the receipt's claim, in RC's partition,
                                     while giftstream:{pUU}:receipt:RC sits in the buyer's
    giftstream:payout_claim:IK       hash, Redis Cluster only: owner (the creator), params
                                     (the diamonds), ts: the key's claim, likewise
    giftstream:ledger                stream: one entry per movement, field `data` (configurable)
    giftstream:board:session:R       zset: sender -> coins gifted in room R's live session now
                                     (emptied when R goes live; counted by the script that
                                     credits R's creator, once per gift)
    giftstream:board:week:C:W        zset: sender -> coins gifted to creator C in the ISO week
                                     whose Monday is epoch day W (UTC); expires 15 days on
    giftstream:board:creators_day:D  zset: creator -> coins received on epoch day D (UTC), one
                                     per partition on a cluster; expires 3 days on
    giftstream:board:names:R         hash: user -> display name as JSON text, for the members
                                     of room R's session and week boards (R's creator's keys)
    giftstream:board:creator_names   hash: creator -> display name as JSON text, for the
                                     creators_day boards (one per partition on a cluster)
    giftstream:{pCC}:credited        hash, Redis Cluster only: partition CC's credit cursors,
                                     field pSS = the last ledger id of partition SS credited
    giftstream:partitions            string, Redis Cluster only: the partition count, set
                                     at the first start (SET NX) and kept for good
    giftstream:rooms:live            set: the ids of the rooms live now (one per partition on
                                     a cluster, KeySpace.live_rooms_of / all_live_rooms)
    giftstream:relays                hash, Redis Cluster only: each running relay process's
                                     heartbeat, field = relay id, value = when it expires
                                     (ms, Redis's clock); the relays share the ledgers' leases
                                     by it (KeySpace.relays; another ledger key: its own hash)
    giftstream:durable_ack           string, one Redis with --durable-ack only: a counter
                                     written after each movement so WAITAOF covers it
    giftstream:{pNN}:durable_mark    string, Redis Cluster with --durable-ack: the same, per
                                     partition, before the WAIT for its shard's replicas

Redis Cluster only, the creators' credit across partitions (crediting.py):

    giftstream:{pSS}:credits:pCC     stream: the gifts of senders in partition SS to creators
                                     in CC, each with its ledger entry's id; kept an hour after
                                     crediting (a creator shard's failover re-credits from it)
    giftstream:{pCC}:credited        hash: field pSS = the last outbox id of SS credited to CC
    giftstream:{pSS}:credit_take     string: counter written by each take that read entries,
                                     so the WAIT after it covers what was read

Keys that belong to one ledger stream L carry its name, so on a cluster they share its slot:
L:dead (the consumers' dead letters), L:relay_mark (a counter the relay writes so a WAIT
covers what it read), L:checkpoint and L:checkpoint:* (the checkpoint
folder's state), giftstream:relay:lease:L (the relay's lease on L).

On a Redis Cluster every per-user key above carries its partition's hash tag after the prefix
(`giftstream:{p07}:wallet:U`) and each partition has its own ledger; `KeySpace` gives every
name in both layouts, so no module builds a key by hand.

User, room and gift ids are 1-64 characters of [A-Za-z0-9_.:-] and idempotency keys have
no ':' (protocol/rules.py), so `giftstream:wallet:*` matches wallets only and the last part
of each key reads back unambiguously; the combo key joins two ids that may both hold ':'
with '/'.
`giftstream:room:*` and `giftstream:rooms:*` belong to the realtime path (named here too):
hub.py keeps each room's record and the live sets, the brokers the seq bound in the record,
the Redis broker each room's log and presence. `giftstream:ops:log` (opslog.py) and
`giftstream:gateways` (registry.py) are one key each for the whole service.

What is read back comes as bytes (no client here decodes replies, so binary stays binary);
`text` reads a key, id or field as str.
"""

from __future__ import annotations

import functools
import time
import zlib
from dataclasses import dataclass
from typing import Any

PREFIX = "giftstream:"
LEDGER = PREFIX + "ledger"
WALLET_PREFIX = PREFIX + "wallet:"
WALLET_MATCH = WALLET_PREFIX + "*"

GIFT_KEY_TTL_MS = 24 * 3600 * 1000  # the contract answers a gift key for at least 24 h
COMBO_GAP_MS = 5000  # a streak grows while gaps stay under this
COMBO_TTL_MS = 60_000  # only garbage collection: the gap is judged by the gift's time


def text(value: Any) -> str:
    """A Redis reply's key, id or field as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class KeySpace:
    """Names every money and room key, from (id, partition count, cluster or not), so no module
    builds one by hand. One Redis (`cluster=False`, the default) gets exactly the names above.

    On a Redis Cluster each user's keys carry the hash tag of their partition after the prefix
    (`giftstream:{p07}:wallet:ann`), so one script may touch them all on one shard; a room's
    keys take its creator's partition (a room id is its creator's user id), and each partition
    has its own ledger stream. partition(user) = crc32(user) % partitions: stable across
    processes and releases, computed here only (scripts are given the keys).
    """

    ledger_key: str = LEDGER
    partitions: int = 1
    cluster: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ValueError(f"partitions must be 1-{MAX_PARTITIONS}, not {self.partitions}")
        if not self.cluster and self.partitions != 1:
            raise ValueError("one Redis has one partition: partitions > 1 needs a Redis Cluster")

    def partition(self, user: str) -> int:
        """The partition of a user (or room, receipt or payout key): fixed for the data's life."""
        return zlib.crc32(user.encode()) % self.partitions if self.partitions > 1 else 0

    def tag(self, partition: int) -> str:
        """The key part after the prefix that pins a partition to one slot ('' on one Redis)."""
        return f"{{p{partition:02d}}}:" if self.cluster else ""

    def _of(self, owner: str, rest: str) -> str:
        return f"{PREFIX}{self.tag(self.partition(owner))}{rest}"

    # ---- money ----------------------------------------------------------------------------

    def wallet(self, user: str) -> str:
        return self._of(user, f"wallet:{user}")

    @property
    def wallet_match(self) -> str:
        """A SCAN pattern matching every wallet key (of every partition) and nothing else."""
        return f"{PREFIX}{{p*}}:wallet:*" if self.cluster else WALLET_MATCH

    def user_of_wallet(self, key: str) -> str:
        rest = key.removeprefix(PREFIX)
        if self.cluster and rest.startswith("{"):
            rest = rest.split("}:", 1)[1]  # ids hold no braces (protocol/rules.py)
        return rest.removeprefix("wallet:")

    def gift_key(self, sender: str, key: str) -> str:
        """Scoped to the sender: two users' equal keys never collide."""
        return self._of(sender, f"gift_key:{sender}:{key}")

    def held(self, creator: str) -> str:
        return self._of(creator, f"held:{creator}")

    def combo(self, sender: str, room: str) -> str:
        """In the sender's partition: the gift script (on the sender's shard) keeps it."""
        return self._of(sender, f"combo:{sender}/{room}")

    def receipt(self, receipt_id: str, *, owner: str | None = None) -> str:
        """A purchase's record, later its refund's. On a cluster it sits in its buyer's
        partition (`owner`, required there) so purchase.lua and refund.lua touch it with the
        wallet on one shard; the receipt's own claim (`receipt_claim`) keeps it global."""
        return self._of(self._owner(owner, "receipt"), f"receipt:{receipt_id}")

    def receipt_claim(self, receipt_id: str) -> str:
        """Cluster only: which user (and package) a receipt went to, in the receipt's own
        partition, so a replay of it on another user is refused (server/money/claims.py)."""
        return self._of(receipt_id, f"receipt_claim:{receipt_id}")

    def payout(self, key: str, *, owner: str | None = None) -> str:
        """A payout's record. Payout keys are global, not per creator: one key never pays out
        twice (on a cluster its claim, `payout_claim`, sees to that, and the record sits in
        the creator's partition, `owner`, required there)."""
        return self._of(self._owner(owner, "payout"), f"payout:{key}")

    def payout_claim(self, key: str) -> str:
        """Cluster only: which creator (and diamonds) a payout key went to, in the key's own
        partition (server/money/claims.py)."""
        return self._of(key, f"payout_claim:{key}")

    def _owner(self, owner: str | None, what: str) -> str:
        """The user whose partition holds a record (any on one Redis: there is one)."""
        if owner is None:
            if self.cluster:
                raise ValueError(f"a {what} record on a cluster sits in its owner's partition")
            return ""
        return owner

    def ledger(self, partition: int = 0) -> str:
        """The ledger stream of a partition: the configured key itself on one Redis."""
        if not self.cluster:
            return self.ledger_key
        return f"{PREFIX}{self.tag(partition)}{self.ledger_key.removeprefix(PREFIX)}"

    def ledgers(self) -> list[str]:
        """Every partition's ledger stream, partition 0 first."""
        return [self.ledger(p) for p in range(self.partitions)]

    def ledger_of(self, user: str) -> str:
        """The ledger stream a user's movements are appended to."""
        return self.ledger(self.partition(user))

    def relays(self) -> str:
        """The relay processes' heartbeats for these ledgers (server/ledger/relay/share.py):
        one small hash, in any slot; a ledger key of its own gets a hash of its own, so relays
        of another ledger never count in its fair shares."""
        return RELAYS if self.ledger_key == LEDGER else f"{RELAYS}:{self.ledger_key}"

    # ---- crediting a gift's creator in another partition (Redis Cluster) -----------------

    def credit_outbox(self, source: int, target: int) -> str:
        """The gifts of partition `source`'s senders to `target`'s creators, in the source's
        slot: the gift script appends to it with its ledger entry, on the sender's shard."""
        return f"{PREFIX}{self.tag(source)}credits:p{target:02d}"

    def credit_cursors(self, target: int) -> str:
        """Per source partition, the last outbox id credited to `target`: in the target's slot,
        so a credit and its cursor move in one script."""
        return f"{PREFIX}{self.tag(target)}credited"

    @staticmethod
    def credit_cursor_field(source: int) -> str:
        """The field of source partition `source` in a cursors hash: p00, p01, ..."""
        return f"p{source:02d}"

    def durable_mark(self, key: str) -> str:
        """Redis Cluster, --durable-ack: a counter in the slot of `key` (a partition's key of
        this KeySpace), written before the WAIT that makes a movement's answer durable, so
        the WAIT covers the movement even when a replay wrote nothing itself."""
        tag = key.removeprefix(PREFIX).split("}:", 1)[0] + "}:"
        if not (self.cluster and tag.startswith("{p")):
            raise ValueError(f"not a partition's key of a cluster: {key}")
        return f"{PREFIX}{tag}durable_mark"

    def credit_take_marker(self, source: int) -> str:
        """Written by a take that read entries, so a WAIT on its connection covers them."""
        return f"{PREFIX}{self.tag(source)}credit_take"

    def durable_ack_marker(self) -> str:
        """One Redis, --durable-ack: written after a gift so WAITAOF on its connection covers
        the gift (WAITAOF waits for the writes of its own connection)."""
        return f"{PREFIX}durable_ack"

    # ---- the earnings consumer's counters (hash-tagged by creator since they were made) ---

    def earnings(self, creator: str) -> str:
        return f"{PREFIX}{self.tag(self.partition(creator))}earnings:{{{creator}}}"

    def earnings_seen(self, creator: str, day: str) -> str:
        return f"{PREFIX}{self.tag(self.partition(creator))}earnings_seen:{{{creator}}}:{day}"

    # ---- rooms (the realtime path): a room takes its creator's partition -----------------

    def room(self, room_id: str) -> str:
        """The room's hash: its record, seq bound and last viewer count (broker.py)."""
        return self._of(room_id, f"room:{room_id}")

    def room_log(self, room_id: str) -> str:
        """The room's event log stream (Redis broker)."""
        return self._of(room_id, f"room:{room_id}:log")

    def room_presence(self, room_id: str) -> str:
        """The room's viewers per gateway (Redis broker)."""
        return self._of(room_id, f"room:{room_id}:presence")

    def live_rooms_of(self, room_id: str) -> str:
        """The live-room set the room belongs in: its creator's partition's, so the room
        scripts touch it with the room's keys on one shard (one Redis: the one set)."""
        return self._of(room_id, LIVE_ROOMS.removeprefix(PREFIX))

    # ---- leaderboards: counted by the script that credits the creator, in the creator's ----
    # partition. A board of a period is named by its prefix and the period's epoch day (the
    # week's Monday), which the script appends itself from the gift's own time: the period
    # is the settlement's, not a gateway clock's.

    def board_session(self, room_id: str) -> str:
        return self._of(room_id, f"board:session:{room_id}")

    def board_week_prefix(self, creator: str) -> str:
        return self._of(creator, f"board:week:{creator}:")

    def board_week(self, creator: str, week: int) -> str:
        """The ISO week whose Monday is epoch day `week` (keys.iso_week)."""
        return f"{self.board_week_prefix(creator)}{week}"

    def board_creators_day_prefix(self, partition: int) -> str:
        return f"{PREFIX}{self.tag(partition)}board:creators_day:"

    def board_creators_day(self, partition: int, day: int) -> str:
        """Creators of `partition` by coins received on epoch day `day`."""
        return f"{self.board_creators_day_prefix(partition)}{day}"

    def board_names(self, room_id: str) -> str:
        return self._of(room_id, f"board:names:{room_id}")

    def board_creator_names(self, partition: int) -> str:
        return f"{PREFIX}{self.tag(partition)}board:creator_names"

    def all_live_rooms(self) -> list[str]:
        """Every partition's live-room set, partition 0 first: readers take their union (and
        sum counts outside scripts, which may not read keys of several slots)."""
        rest = LIVE_ROOMS.removeprefix(PREFIX)
        return [f"{PREFIX}{self.tag(p)}{rest}" for p in range(self.partitions)]


MAX_PARTITIONS = 1024
DEFAULT_PARTITIONS = 16  # a Redis Cluster's, unless --partitions says otherwise at its first start
PARTITIONS = PREFIX + "partitions"  # string, on a cluster only: the partition count, set once
SINGLE = KeySpace()  # one Redis with the default ledger key: today's names
LIVE_ROOMS = PREFIX + "rooms:live"  # set: the ids of the rooms live now, one Redis's name
OPS_LOG = PREFIX + "ops:log"  # stream: the service's ops notices (realtime/opslog.py)
RELAYS = PREFIX + "relays"  # hash: each relay process's heartbeat (KeySpace.relays)
GATEWAYS = PREFIX + "gateways"  # hash: each gateway's heartbeat (realtime/registry.py)


def dead_letters(ledger: str) -> str:
    """The default dead-letter stream of a ledger stream: giftstream:ledger:dead."""
    return ledger + ":dead"


def checkpoint(ledger: str) -> str:
    """The checkpoint hash of a ledger stream; its other keys are this name plus a suffix."""
    return ledger + ":checkpoint"


def relay_mark(ledger: str) -> str:
    """Redis Cluster: the mark the relay writes, in its ledger's slot, before a WAIT that
    says the entries it read are on the replicas (same_connection.replicated)."""
    return ledger + ":relay_mark"


def relay_lease(ledger: str) -> str:
    """The lease that lets one relay at a time publish a ledger stream."""
    return f"{PREFIX}relay:lease:{ledger}"


def utc_day(now_ms: int) -> str:
    """YYYY-MM-DD in UTC. Asked once per gift, so the last few days' names are kept."""
    return _day_name(now_ms // DAY_MS)


DAY_MS = 86_400_000


def epoch_day(now_ms: int) -> int:
    """The UTC day of now_ms as days since 1970-01-01, as the scripts count days."""
    return now_ms // DAY_MS


def iso_week(day: int) -> int:
    """The ISO week (Monday to Sunday, UTC) of an epoch day, as its Monday's epoch day, as the
    scripts count weeks (1970-01-01 was a Thursday)."""
    return day - (day + 3) % 7


@functools.lru_cache(maxsize=4)
def _day_name(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86_400))
