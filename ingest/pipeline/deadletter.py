"""Dead letters: records that cannot be stored, sent to the dead-letter topic with a reason.

The original key and value bytes are kept unchanged; the reason travels in headers.
Reason codes (``x-ingest-reason``):

- ``invalid_json``: the value is not UTF-8 JSON (or is empty);
- ``invalid_event``: JSON, but not the event contract (``x-ingest-detail`` says which field);
- ``unknown_call``: not an initiation, and no ``calls`` row nor an earlier initiation exists;
- ``unknown_agent``: an initiation naming an agent that does not exist;
- ``db_rejected``: PostgreSQL refused the record (SQLSTATE class 22 or 23), isolated by
  bisecting its batch; ``x-ingest-sqlstate`` carries the code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from aiokafka import AIOKafkaProducer

from ingest.pipeline.contract import RecordRef

UNKNOWN_CALL: Final = "unknown_call"
UNKNOWN_AGENT: Final = "unknown_agent"
DB_REJECTED: Final = "db_rejected"
REASONS: Final = ("invalid_json", "invalid_event", UNKNOWN_CALL, UNKNOWN_AGENT, DB_REJECTED)

H_REASON: Final = "x-ingest-reason"
H_DETAIL: Final = "x-ingest-detail"
H_TOPIC: Final = "x-ingest-source-topic"
H_PARTITION: Final = "x-ingest-source-partition"
H_OFFSET: Final = "x-ingest-source-offset"
H_SQLSTATE: Final = "x-ingest-sqlstate"
MAX_DETAIL_CHARS: Final = 1000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record that goes to the dead-letter topic instead of the database."""

    ref: RecordRef
    key: bytes | None
    value: bytes | None
    reason: str
    detail: str
    sqlstate: str | None = None

    def headers(self) -> list[tuple[str, bytes]]:
        """The Kafka headers that say where the record came from and why it is here."""
        detail = (
            self.detail
            if len(self.detail) <= MAX_DETAIL_CHARS
            else (self.detail[: MAX_DETAIL_CHARS - 3] + "...")
        )
        hs = [
            (H_REASON, self.reason.encode()),
            (H_DETAIL, detail.encode("utf-8", "replace")),
            (H_TOPIC, self.ref.topic.encode()),
            (H_PARTITION, str(self.ref.partition).encode()),
            (H_OFFSET, str(self.ref.offset).encode()),
        ]
        if self.sqlstate is not None:
            hs.append((H_SQLSTATE, self.sqlstate.encode()))
        return hs


def header_map(headers: Iterable[tuple[str, bytes]]) -> dict[str, str]:
    """Decode a record's headers into a dict (last one wins), for readers of the topic."""
    return {k: v.decode("utf-8", "replace") for k, v in headers}


class DeadLetterPublisher:
    """Sends dead letters and waits for the broker's acknowledgement of every one.

    Within a process a record is sent once, even when the batch that held it is retried:
    ``publish`` skips refs already acknowledged until ``forget`` is told they are committed.
    A crash between the acknowledgement and the database commit can still repeat a dead
    letter; readers de-duplicate by the source-coordinate headers.
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self._topic = topic
        self._acked: set[RecordRef] = set()

    @property
    def topic(self) -> str:
        """The dead-letter topic."""
        return self._topic

    async def publish(self, letters: Sequence[DeadLetter]) -> None:
        """Send every letter not yet acknowledged; return once the broker has all of them."""
        pending = [dl for dl in letters if dl.ref not in self._acked]
        if not pending:
            return
        futures = [
            await self._producer.send(self._topic, value=dl.value, key=dl.key, headers=dl.headers())
            for dl in pending
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        first_error: BaseException | None = None
        for dl, res in zip(pending, results, strict=True):
            if isinstance(res, BaseException):
                first_error = first_error or res
            else:
                self._acked.add(dl.ref)
        if first_error is not None:
            raise first_error

    def forget(self, refs: Iterable[RecordRef]) -> None:
        """Drop bookkeeping for letters whose offsets are now stored."""
        self._acked.difference_update(refs)
