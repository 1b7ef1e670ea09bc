"""Transport security: TLS to PostgreSQL, SSL / SASL to Kafka, built from the settings.

``sslmode`` (and ``sslrootcert``...) in ``DATABASE_URL`` work as asyncpg reads them; the
explicit ``DATABASE_SSL_*`` settings, when given, build an SSL context instead. Kafka
speaks PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512).
The options of every Kafka client also carry the timeouts that notice a dead connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from aiokafka.helpers import create_ssl_context

from ingest.service.settings import Settings


def postgres_ssl(settings: Settings) -> ssl.SSLContext | None:
    """An SSL context for asyncpg when ``DATABASE_SSL_MODE`` is set; None leaves the URL's."""
    mode = settings.database_ssl_mode
    if mode is None or mode == "disable":
        return None
    ctx = ssl.create_default_context(cafile=settings.database_ssl_root_cert)
    if mode == "require" and settings.database_ssl_root_cert is None:
        # libpq's 'require': encrypted, server not verified.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif mode in ("require", "verify-ca"):
        ctx.check_hostname = False
    if settings.database_ssl_cert is not None:
        ctx.load_cert_chain(settings.database_ssl_cert, settings.database_ssl_key)
    return ctx


def kafka_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for every aiokafka client (consumer, producer, admin): transport
    security, and the timeouts that notice a dead connection (``kafka_timeouts``)."""
    protocol = settings.kafka_security_protocol
    opts: dict[str, Any] = {"security_protocol": protocol, **kafka_timeouts(settings)}
    if protocol in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_ca_file,
            certfile=settings.kafka_ssl_cert_file,
            keyfile=settings.kafka_ssl_key_file,
        )
    if protocol.startswith("SASL_"):
        opts["sasl_mechanism"] = settings.kafka_sasl_mechanism
        opts["sasl_plain_username"] = settings.kafka_sasl_username
        opts["sasl_plain_password"] = settings.kafka_sasl_password
    return opts


def kafka_timeouts(settings: Settings) -> dict[str, Any]:
    """How soon an aiokafka client gives up on a connection that carries nothing more (a
    lost NAT entry, a hung middlebox: no RST, no FIN).

    A request unanswered after ``request_timeout_ms`` fails and aiokafka closes its
    connection, so the next request opens a new one. A connection idle for
    ``connections_max_idle_ms`` is closed before its next use, so the dead-letter
    producer's, frozen while idle, is not found dead only a request timeout later, after
    the fetch connection has been."""
    return {
        "request_timeout_ms": settings.kafka_request_timeout_ms,
        "connections_max_idle_ms": settings.kafka_connections_max_idle_ms,
    }


async def kafka_tls_failure(
    settings: Settings, options: dict[str, Any], timeout_s: float = 5.0
) -> ssl.SSLCertVerificationError | None:
    """Why a TLS bootstrap failed, when it is the broker's certificate: aiokafka logs the
    handshake error and raises only "Unable to bootstrap", which reads like a network blip.
    One handshake per bootstrap address, with the client's own SSL context."""
    ctx = options.get("ssl_context")
    if not isinstance(ctx, ssl.SSLContext):
        return None
    for address in settings.kafka_bootstrap_servers.split(","):
        host, _, port = address.strip().rpartition(":")
        host = host.strip("[]")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=host), timeout_s
            )
        except ssl.SSLCertVerificationError as exc:
            return exc
        except (OSError, TimeoutError, ValueError):
            continue
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return None
