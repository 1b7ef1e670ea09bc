"""ingest: moves call-lifecycle events from Kafka into PostgreSQL / TimescaleDB."""

__version__ = "0.1.0"
