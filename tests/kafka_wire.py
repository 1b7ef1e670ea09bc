"""Kafka at the byte level, for tests that need what no well-behaved producer sends: record
batches built by hand (a corrupt CRC) and the codec a broker really stored a batch with.

aiokafka's record builder and protocol classes do the encoding; only the few fixed header
fields of a v2 record batch are touched here (offsets from the Kafka protocol spec).
"""

from __future__ import annotations

import struct

from aiokafka import TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import for_code
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords

# v2 record batch header: baseOffset int64, batchLength int32, partitionLeaderEpoch int32,
# magic int8, crc uint32 (over everything after it), attributes int16 (low 3 bits: codec).
_CRC_AT = 17
_ATTRIBUTES_AT = 21
CODECS = {0: "none", 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}


def record_batch(values: list[bytes], keys: list[bytes | None] | None = None) -> bytes:
    """An uncompressed v2 record batch holding ``values`` (offsets 0..n-1 within it)."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=0,
        is_transactional=0,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for i, value in enumerate(values):
        key = keys[i] if keys is not None else None
        builder.append(i, timestamp=None, key=key, value=value, headers=[])
    return bytes(builder.build())


def with_bad_crc(batch: bytes) -> bytes:
    """The same batch with its stored CRC no longer matching its contents."""
    data = bytearray(batch)
    (crc,) = struct.unpack_from(">I", data, _CRC_AT)
    struct.pack_into(">I", data, _CRC_AT, crc ^ 0xFFFFFFFF)
    return bytes(data)


async def _client(bootstrap: str) -> AIOKafkaClient:
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    return client


async def produce_raw(bootstrap: str, topic: str, partition: int, batch: bytes) -> int:
    """Send ``batch`` as it is in one ProduceRequest; the base offset the broker gave it."""
    client = await _client(bootstrap)
    try:
        await client.force_metadata_update()
        node = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        request = ProduceRequest(None, -1, 5000, [(topic, [(partition, batch)])])
        response = await client.send(node, request)
    finally:
        await client.close()
    _, partitions = response.topics[0]
    _, error_code, offset, *_ = partitions[0]
    if error_code != 0:
        raise for_code(error_code)(f"raw produce to {topic}/{partition}")
    return int(offset)


async def stored_codecs(bootstrap: str, topic: str, partition: int) -> list[str]:
    """The codec of every record batch the broker returns for the partition, from offset 0."""
    client = await _client(bootstrap)
    try:
        await client.force_metadata_update()
        node = client.cluster.leader_for_partition(TopicPartition(topic, partition))
        request = FetchRequest(
            max_wait_time=100,
            min_bytes=1,
            max_bytes=16 << 20,
            isolation_level=0,
            topics=[(topic, [(partition, 0, 16 << 20)])],
        )
        response = await client.send(node, request)
    finally:
        await client.close()
    raw = response.topics[0][1][0][-1]
    records = MemoryRecords(raw)
    codecs = []
    while records.has_next():
        batch = records.next_batch()
        codecs.append(CODECS[batch.compression_type])
    return codecs


class RequestKeys:
    """The API keys of the Kafka requests in a client's byte stream, fed as it comes (a
    ``tests.faults.tcpfreeze.Watcher``). Each request is an int32 size, then the request:
    its header starts with the int16 API key; the rest is skipped, not kept."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self._head = bytearray()
        self._skip = 0

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the stream."""
        view = memoryview(data)
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            n = min(6 - len(self._head), len(view))
            self._head += view[:n]
            view = view[n:]
            if len(self._head) == 6:
                size, api_key = struct.unpack(">ih", self._head)
                self.seen.add(api_key)
                self._skip = size - 2
                self._head.clear()
