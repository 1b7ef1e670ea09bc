-- Where each consumer group stands per partition, written in the same transaction as the
-- events: the source of truth for exactly-once storage and the fence against a worker that
-- lost its partitions mid-write. Kafka's committed offsets follow it, for lag tooling.

-- migrate:up
CREATE TABLE ingest_consumer_offsets (
    consumer_group TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL CHECK (partition >= 0),
    next_offset BIGINT NOT NULL CHECK (next_offset >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- migrate:down
DROP TABLE ingest_consumer_offsets;
