"""A Kafka-protocol proxy that answers a fetch below a partition's log start as Apache Kafka
does: OFFSET_OUT_OF_RANGE, no records.

Tansu 0.6 serves such a fetch with the next records it holds instead, so a worker running
against it never sees that answer. In front of Tansu (whose ``--advertised-listener-url``
names the proxy, so every client flow passes through it), the proxy forwards everything
byte for byte, except the Fetch responses of partitions the test gave a log start: their
partitions fetched below it get Kafka's answer. The test moves the log start on the broker
itself too (by deleting the batches below it), so the two agree.

Fetch v4 to v11 (what aiokafka 0.14 speaks; none of them flexible) are decoded and encoded
with aiokafka's own protocol classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any

from aiokafka.protocol import fetch

OFFSET_OUT_OF_RANGE = 1
_FETCH = 1
_REQUESTS = {v: getattr(fetch, f"FetchRequest_v{v}") for v in range(4, 12)}
_RESPONSES = {v: getattr(fetch, f"FetchResponse_v{v}") for v in range(4, 12)}


def _fetch_offset_at(version: int) -> int:
    # Per partition: (partition, fetch_offset, ...) up to v8; v9 put current_leader_epoch
    # between them.
    return 2 if version >= 9 else 1


class LogStartProxy:
    """Listens on ``port`` (free when 0) and forwards to ``upstream`` (host, port)."""

    def __init__(self, upstream: tuple[str, int], port: int = 0) -> None:
        self._upstream = upstream
        self._port = port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        # (topic, partition) -> log start: fetches below it are refused.
        self.log_start: dict[tuple[str, int], int] = {}
        self.refused = 0
        # Fetches forwarded and not yet answered, one set of correlation ids per flow.
        self._waiting: dict[int, set[int]] = {}
        self._answered = asyncio.Condition()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self._port)

    async def fetches_answered(self, timeout_s: float) -> None:
        """Return once every fetch forwarded so far has been answered. A client frozen
        (SIGSTOP) sends none after: whatever the broker gets from then on, no fetch of that
        client can carry it before the client runs again."""
        async with self._answered:
            await asyncio.wait_for(
                self._answered.wait_for(lambda: not any(self._waiting.values())), timeout_s
            )

    async def stop(self) -> None:
        """Stop listening and close every flow (its handler then ends by itself: asyncio
        logs a connection handler that was cancelled as an error)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_w)
        try:
            broker_r, broker_w = await asyncio.open_connection(*self._upstream)
        except OSError:
            client_w.close()
            self._writers.discard(client_w)
            self._tasks.discard(task)
            return
        self._writers.add(broker_w)
        # correlation id -> (fetch version, {(topic, partition): fetch offset})
        fetches: dict[int, tuple[int, dict[tuple[str, int], int]]] = {}
        waiting = self._waiting.setdefault(id(task), set())
        up = asyncio.create_task(self._requests(client_r, broker_w, fetches, waiting))
        down = asyncio.create_task(self._responses(broker_r, client_w, fetches, waiting))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            for w in (client_w, broker_w):
                w.close()
                self._writers.discard(w)
            self._tasks.discard(task)
            del self._waiting[id(task)]
            async with self._answered:
                self._answered.notify_all()

    async def _requests(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fetches: dict[int, tuple[int, dict[tuple[str, int], int]]],
        waiting: set[int],
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                frame = await _frame(reader)
                api_key, version, correlation = struct.unpack_from(">hhi", frame, 4)
                if api_key == _FETCH:
                    waiting.add(correlation)
                if api_key == _FETCH and version in _REQUESTS and self.log_start:
                    (client_len,) = struct.unpack_from(">h", frame, 12)
                    body = frame[14 + max(0, client_len) :]
                    request = _REQUESTS[version].decode(body)
                    at = _fetch_offset_at(version)
                    fetches[correlation] = (
                        version,
                        {(t, p[0]): p[at] for t, parts in request.topics for p in parts},
                    )
                writer.write(frame)
                await writer.drain()

    async def _responses(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        fetches: dict[int, tuple[int, dict[tuple[str, int], int]]],
        waiting: set[int],
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                frame = await _frame(reader)
                (correlation,) = struct.unpack_from(">i", frame, 4)
                asked = fetches.pop(correlation, None)
                if asked is not None:
                    frame = self._refuse_below_log_start(frame, *asked)
                writer.write(frame)
                await writer.drain()
                if correlation in waiting:
                    waiting.discard(correlation)
                    async with self._answered:
                        self._answered.notify_all()

    def _refuse_below_log_start(
        self, frame: bytes, version: int, asked: dict[tuple[str, int], int]
    ) -> bytes:
        response = _RESPONSES[version].decode(frame[8:])
        changed = False
        topics: list[Any] = []
        for topic, partitions in response.topics:
            parts = []
            for p in partitions:
                start = self.log_start.get((topic, p[0]))
                offset = asked.get((topic, p[0]))
                if start is not None and offset is not None and offset < start:
                    p = list(p)
                    p[1] = OFFSET_OUT_OF_RANGE
                    if version >= 5:
                        p[4] = start  # log_start_offset
                    p[-1] = b""  # no records
                    p = tuple(p)
                    changed = True
                    self.refused += 1
                parts.append(p)
            topics.append((topic, parts))
        if not changed:
            return frame
        response.topics = topics
        payload = frame[4:8] + response.encode()
        return struct.pack(">i", len(payload)) + payload


async def _frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(4)
    (size,) = struct.unpack(">i", head)
    return head + await reader.readexactly(size)
