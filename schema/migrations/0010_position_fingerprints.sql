-- With each stored position, a fingerprint of the last record stored below it (the record
-- at next_offset - 1: its timestamp, key and value). On assignment the worker fetches that
-- record and compares: a topic deleted and created again, or another cluster behind the same
-- name, has a different record there (or none), and the partition is held instead of
-- resuming from a position that belongs to another log. NULL where nothing was stored yet,
-- for rows written before this migration, and after `ingest positions reset`.

-- migrate:up
ALTER TABLE ingest_consumer_offsets ADD COLUMN last_record_fingerprint BYTEA;

-- migrate:down
ALTER TABLE ingest_consumer_offsets DROP COLUMN last_record_fingerprint;
