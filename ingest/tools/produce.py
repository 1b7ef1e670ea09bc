"""Synthetic traffic: realistic calls (initiation, answer, transcriptions and responses,
sometimes an error, usually a termination), keyed by call id, with a share of bad records."""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

PHRASES = (
    "Hello, I'd like to check my order status.",
    "Sure, can I have your order number?",
    "It's 4 4 1 9 2.",
    "Thanks. Your order ships tomorrow.",
    "Can I change the delivery address?",
    "Of course. What is the new address?",
    "That's all, thank you.",
)


@dataclass(slots=True)
class ProduceStats:
    """What ``produce`` published."""

    calls: int = 0
    events: int = 0
    invalid: int = 0


def _phone(rng: random.Random) -> str:
    return "+1" + "".join(rng.choice("0123456789") for _ in range(10))


def synthetic_call(
    rng: random.Random, start: datetime, agent_id: uuid.UUID | None = None
) -> list[dict[str, Any]]:
    """The events of one call, in order, with event times from ``start`` onwards."""
    call_id = uuid.UUID(int=rng.getrandbits(128), version=4)
    t = start
    events: list[dict[str, Any]] = []

    def add(event_type: str, data: dict[str, Any], step_s: float) -> None:
        nonlocal t
        t = t + timedelta(seconds=step_s)
        events.append(
            {
                "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "call_id": str(call_id),
                "event_type": event_type,
                "event_data": data,
                "created_at": t.isoformat(),
            }
        )

    init: dict[str, Any] = {"from_number": _phone(rng), "to_number": _phone(rng)}
    if agent_id is not None:
        init["agent_id"] = str(agent_id)
    add("initiation", init, 0)
    if rng.random() < 0.9:
        add("answer", {"ring_seconds": round(rng.uniform(1, 12), 1)}, rng.uniform(1, 12))
        for turn in range(rng.randint(1, 6)):
            add(
                "transcription",
                {
                    "speaker": "caller",
                    "text": rng.choice(PHRASES),
                    "confidence": round(rng.uniform(0.7, 1), 3),
                },
                rng.uniform(1, 8),
            )
            add(
                "response",
                {"text": rng.choice(PHRASES), "turn": turn, "latency_ms": rng.randint(200, 1500)},
                rng.uniform(0.3, 2),
            )
        if rng.random() < 0.05:
            add(
                "error",
                {"code": "asr_timeout", "message": "speech recognition timed out"},
                rng.uniform(0.1, 2),
            )
    if rng.random() < 0.95:
        answered = any(e["event_type"] == "answer" for e in events)
        add(
            "termination",
            {
                "status": "completed" if answered else "no_answer",
                "recording_url": f"https://recordings.example.com/{call_id}.wav",
                "sentiment_score": round(rng.uniform(-1, 1), 3),
                "cost_cents": rng.randint(1, 500),
            },
            rng.uniform(1, 5),
        )
    return events


def invalid_record(rng: random.Random, good: dict[str, Any]) -> bytes:
    """A bad record of one of the kinds producers really send."""
    kind = rng.randrange(5)
    if kind == 0:
        return b"{not json"
    bad = dict(good)
    if kind == 1:
        bad["event_type"] = "hangup"
    elif kind == 2:
        bad["call_id"] = "not-a-uuid"
    elif kind == 3:
        bad["event_data"] = {"text": "nul \x00 inside"}
    else:
        bad["created_at"] = "yesterday"
    return orjson.dumps(bad)


def interleave(
    rng: random.Random,
    calls: int,
    concurrency: int = 50,
    agent_ids: list[uuid.UUID] | None = None,
    start: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """Events of ``calls`` calls, ``concurrency`` at a time, each call's events in order.

    The same ``rng`` state and ``start`` give the same events.
    """
    now = start or datetime.now(UTC)
    active: list[list[dict[str, Any]]] = []
    started = 0
    while started < calls or active:
        while started < calls and len(active) < concurrency:
            agent = rng.choice(agent_ids) if agent_ids else None
            active.append(synthetic_call(rng, now + timedelta(milliseconds=started), agent))
            started += 1
        i = rng.randrange(len(active))
        yield active[i].pop(0)
        if not active[i]:
            active.pop(i)


async def produce(
    bootstrap: str,
    topic: str,
    calls: int,
    rate: float = 0.0,
    invalid_fraction: float = 0.0,
    seed: int | None = None,
    progress: bool = True,
    kafka_options: dict[str, Any] | None = None,
    agent_ids: list[uuid.UUID] | None = None,
    stats: ProduceStats | None = None,
) -> ProduceStats:
    """Publish ``calls`` synthetic calls at ``rate`` events/s (0: as fast as possible).

    ``stats``, when given, is updated as records are sent (for a live display).
    """
    rng = random.Random(seed)
    stats = stats or ProduceStats()
    stats.calls = calls
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        linger_ms=10,
        enable_idempotence=False,
        max_batch_size=256 * 1024,
        **(kafka_options or {}),
    )
    await producer.start()
    started = time.monotonic()
    last_print = started
    pending: list[asyncio.Future[Any]] = []
    try:
        for event in interleave(rng, calls, agent_ids=agent_ids):
            if invalid_fraction > 0 and rng.random() < invalid_fraction:
                value = invalid_record(rng, event)
                stats.invalid += 1
            else:
                value = orjson.dumps(event)
            pending.append(await producer.send(topic, value=value, key=event["call_id"].encode()))
            stats.events += 1
            if len(pending) >= 2000:
                await asyncio.gather(*pending)
                pending.clear()
            if rate > 0:
                ahead = stats.events / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if progress and time.monotonic() - last_print >= 1:
                last_print = time.monotonic()
                el = last_print - started
                print(
                    f"\rproduced {stats.events} events ({stats.invalid} invalid) "
                    f"in {el:.0f}s, {stats.events / el:.0f}/s",
                    end="",
                    file=sys.stderr,
                )
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    if progress:
        el = time.monotonic() - started
        print(
            f"\rproduced {stats.events} events ({stats.invalid} invalid) of {calls} calls "
            f"in {el:.1f}s",
            file=sys.stderr,
        )
    return stats
