"""The relay's JetStream side: connect, learn what it holds, publish a batch in order.

Strictly in order, and still a batch at a time: the relay writes a whole batch to its one
NATS connection in order and then waits for the acknowledgements, so JetStream receives and
stores them in that order; every message after a batch's first carries
`Nats-Expected-Last-Msg-Id` = the message before it, so if JetStream refuses one, it refuses
every later one of the batch too, and what it stored is always a prefix of the batch. The
first message of a batch expects the stream's last sequence as this connection knows it, so
a relay that slept through losing its lease cannot add a stale batch after the new holder's.

A Redis Cluster's ledgers (one per partition) are relayed into the same stream, by relays
publishing at once (`RelayConfig.shared_stream`): the stream's last sequence and last message
are then another ledger's as often as not, so neither fences a batch nor says what of this
ledger JetStream holds. Exactly once rests on `Nats-Msg-Id` alone there: a pending entry
published again (a relay killed between publish and ack, a lapsed holder's batch) is a
duplicate JetStream drops, as long as it comes within the stream's duplicate window (24 h by
default; a ledger's relay is taken over within a lease TTL while any relay process runs).
Each ledger's entries are still published in its order, a batch at a time on one connection;
only a message refused mid-batch and published again after later ones (which JetStream then
drops as duplicates) lands out of that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats
import orjson
from nats.js import api
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from giftstream.server.ledger.entries import stream_id_key
from giftstream.server.ledger.relay.config import RelayConfig

log = logging.getLogger(__name__)

STREAM_ID_HEADER = "Giftstream-Stream-Id"


@dataclass(frozen=True, slots=True)
class Message:
    """One ledger entry as published: its subject by kind, and its event id as Nats-Msg-Id."""

    stream_id: str
    subject: str
    payload: bytes
    msg_id: str


class JetStream:
    """The relay's connection to its JetStream stream, opened and closed by the relay; what
    it learned of the stream outlives a close."""

    def __init__(
        self, config: RelayConfig, connect: Callable[[str], Awaitable[Any]] | None = None
    ) -> None:
        self.config = config
        self._connect = connect or connect_nats
        self._nc: Any = None
        self._inbox = ""
        self._acks: dict[str, asyncio.Future[Any]] = {}
        self._tokens = itertools.count()
        # The last entry JetStream holds, as learned when the connection opened. A pending
        # entry at or below it is acked without publishing. Never raised by our own
        # publishes: an entry another relay read during a lease handover can be pending
        # below them, and it must still be published (see Relay._relay_batch).
        self.stored_upto: tuple[int, int] = (0, 0)
        # JetStream's last sequence, as we know it: the first message of each batch expects
        # it, so a relay that slept through losing its lease cannot add a stale batch after
        # the new holder's messages (None: not known, e.g. after a duplicate; not fenced).
        self._last_seq: int | None = None

    @property
    def is_open(self) -> bool:
        return self._nc is not None

    def message(self, stream_id: str, fields: dict[Any, Any]) -> Message:
        """The message for one ledger entry; one that does not parse is still relayed."""
        data = fields.get(b"data") or fields.get("data")
        payload = data if isinstance(data, bytes) else str(data or "").encode()
        try:
            event = orjson.loads(payload)
            kind, msg_id = str(event["kind"]), str(event["event"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            # never dropped: relayed as it is, for a consumer downstream to look at
            kind, msg_id = "invalid", f"invalid-{stream_id}"
        return Message(stream_id, f"{self.config.subject_prefix}.{kind}", payload, msg_id)

    async def open(self) -> None:
        """Connect, make sure the stream exists, and learn the last entry it holds."""
        self._nc = await self._connect(self.config.nats_url)
        self._inbox = self._nc.new_inbox()
        await self._nc.subscribe(self._inbox + ".*", cb=self._on_pub_ack)
        jsm = self._nc.jsm()
        name = self.config.stream
        try:
            info = await jsm.stream_info(name)
        except NotFoundError:
            info = await jsm.add_stream(
                api.StreamConfig(
                    name=name,
                    subjects=[f"{self.config.subject_prefix}.>"],
                    storage=api.StorageType.FILE,
                    duplicate_window=self.config.duplicate_window_s,
                )
            )
            log.info("created JetStream stream %s", name)
        if self.config.shared_stream:
            return  # the stream's last message is any ledger's: no fence, no stored_upto
        self._last_seq = info.state.last_seq or 0
        if info.state.messages:  # an emptied stream (purged, aged out) keeps a last_seq
            try:
                last = await jsm.get_msg(name, seq=info.state.last_seq)
            except NotFoundError:  # that very message deleted since
                last = None
            stream_id = (last.headers or {}).get(STREAM_ID_HEADER) if last else None
            if stream_id:
                self.stored_upto = stream_id_key(stream_id)
            else:
                log.warning(
                    "the last message of JetStream stream %s is gone or has no %s "
                    "header: only the duplicate window guards against publishing an "
                    "entry twice",
                    name,
                    STREAM_ID_HEADER,
                )

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def publish(self, batch: list[Message]) -> tuple[int, Exception | None]:
        """Publish `batch` in order on the one connection, then wait for the acks. Returns
        how many JetStream stored (always a prefix: each message after the first expects
        the one before it as the stream's last) and the error that stopped the rest.

        nats-py's own publish_async is not used: in nats-py 2.16 an error reply (a refused
        expectation, say) raises inside its reply callback and leaves the future unresolved
        for ever."""
        assert self._nc is not None
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        try:
            previous: str | None = None
            for message in batch:
                token = str(next(self._tokens))
                futures.append(self._acks.setdefault(token, loop.create_future()))
                headers = {"Nats-Msg-Id": message.msg_id, STREAM_ID_HEADER: message.stream_id}
                if self.config.shared_stream:
                    pass  # another ledger's message may come between any two of ours
                elif previous is not None:
                    headers[api.Header.EXPECTED_LAST_MSG_ID] = previous
                elif self._last_seq is not None:
                    headers[api.Header.EXPECTED_LAST_SEQUENCE] = str(self._last_seq)
                previous = message.msg_id
                await self._nc.publish(
                    message.subject,
                    message.payload,
                    reply=f"{self._inbox}.{token}",
                    headers=headers,
                )
            await asyncio.wait(futures, timeout=self.config.publish_timeout_s)
        finally:
            for future in futures:
                future.cancel()  # a no-op on those answered
            self._acks.clear()
        stored = 0
        for future in futures:
            ack = pub_ack(future)
            if isinstance(ack, Exception):
                self._last_seq = None  # the reconnect that follows learns it again
                return stored, ack
            # a duplicate's ack names the first copy's sequence, not the stream's last
            fenced = not ack.get("duplicate") and not self.config.shared_stream
            self._last_seq = int(ack["seq"]) if fenced else None
            stored += 1
        return stored, None

    async def _on_pub_ack(self, msg: Any) -> None:
        future = self._acks.pop(msg.subject.rsplit(".", 1)[-1], None)
        if future is not None and not future.done():
            future.set_result(msg)


def pub_ack(future: asyncio.Future[Any]) -> dict[str, Any] | Exception:
    """JetStream's acknowledgement in `future` (stream, seq, duplicate), or why there is
    none."""
    if future.cancelled():
        return TimeoutError("JetStream did not acknowledge in time")
    msg = future.result()
    if msg.headers and msg.headers.get(api.Header.STATUS) == "503":
        return NoStreamResponseError()  # no stream listens on the subject
    try:
        reply = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        return APIError(description=f"not a JetStream acknowledgement: {msg.data[:200]!r}")
    if "error" not in reply:
        return dict(reply)
    try:
        APIError.from_error(reply["error"])  # raises the error's own class
    except APIError as exc:
        return exc
    return APIError(**reply["error"])


async def connect_nats(url: str) -> Any:
    # No endless reconnecting inside nats-py: the relay's own loop retries, with backoff,
    # counting errors, keeping its lag gauges current and seeing a stop. In nats-py 2.x
    # max_reconnect_attempts=0 means "no limit" even for the first connect (a refused
    # connection is retried inside nats.connect for ever); 1 gives up after two attempts.
    return await nats.connect(
        url,
        connect_timeout=2,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.1,
    )
