"""The options every Kafka client of the worker is made with carry the timeouts that notice a
dead connection, under the names aiokafka's clients take."""

from __future__ import annotations

import inspect

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from ingest.service.security import kafka_options
from ingest.service.settings import Settings


def settings(**env: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": "postgresql://h/db", **env})


def test_the_timeouts_come_from_the_settings() -> None:
    opts = kafka_options(
        settings(KAFKA_REQUEST_TIMEOUT_MS="20000", KAFKA_CONNECTIONS_MAX_IDLE_MS="7000")
    )

    assert opts["request_timeout_ms"] == 20_000
    assert opts["connections_max_idle_ms"] == 7_000


def test_the_timeouts_go_along_with_the_transport_security() -> None:
    opts = kafka_options(
        settings(
            KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
            KAFKA_SASL_USERNAME="u",
            KAFKA_SASL_PASSWORD="p",
        )
    )

    assert opts["security_protocol"] == "SASL_PLAINTEXT"
    assert opts["request_timeout_ms"] == 20_000


@pytest.mark.parametrize("client", [AIOKafkaConsumer, AIOKafkaProducer, AIOKafkaAdminClient])
def test_every_aiokafka_client_takes_every_option(client: type) -> None:
    # A name a client does not know would fail only when the worker makes that client.
    inspect.signature(client).bind_partial(**kafka_options(settings()))
