-- Chunks of call_events on TimescaleDB: time range, compressed or not, size on disk
-- (newest first). Catalog reads only, however large the table.
-- On plain PostgreSQL (no timescaledb_information) it prints one note row instead; the psql
-- \if keeps the TimescaleDB query from being parsed there.
SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') AS ingest_has_timescaledb
\gset
\if :ingest_has_timescaledb
-- Sizes: pg_total_relation_size of the chunk (rows not compressed, with indexes and TOAST)
-- plus its compressed part; TimescaleDB's chunks_detailed_size() says the same 5x slower.
SELECT
    c.chunk_name,
    c.range_start,
    c.range_end,
    c.is_compressed,
    pg_size_pretty(pg_total_relation_size(format('%I.%I', c.chunk_schema, c.chunk_name))
                   + COALESCE(z.after_compression_total_bytes, 0)) AS total_size,
    pg_total_relation_size(format('%I.%I', c.chunk_schema, c.chunk_name))
        + COALESCE(z.after_compression_total_bytes, 0) AS total_bytes
FROM timescaledb_information.chunks c
LEFT JOIN chunk_compression_stats('call_events') z
       ON z.chunk_schema = c.chunk_schema AND z.chunk_name = c.chunk_name
WHERE c.hypertable_schema = current_schema()
  AND c.hypertable_name = 'call_events'
ORDER BY c.range_start DESC;
\else
SELECT 'timescaledb is not installed: call_events is a plain table without chunks' AS note;
\endif
