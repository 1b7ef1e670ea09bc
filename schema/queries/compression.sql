-- Compression of call_events on TimescaleDB: chunks compressed out of all, bytes before and
-- after, the ratio, and the policy (compress after ...). Catalog reads only.
-- On plain PostgreSQL it prints one note row instead (see chunks.sql for the \if).
SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') AS ingest_has_timescaledb
\gset
\if :ingest_has_timescaledb
SELECT
    s.total_chunks,
    s.number_compressed_chunks AS compressed_chunks,
    pg_size_pretty(s.before_compression_total_bytes) AS before_compression,
    pg_size_pretty(s.after_compression_total_bytes) AS after_compression,
    round(s.before_compression_total_bytes::numeric
          / NULLIF(s.after_compression_total_bytes, 0), 1) AS ratio,
    (SELECT j.config ->> 'compress_after'
     FROM timescaledb_information.jobs j
     WHERE j.proc_name = 'policy_compression'
       AND j.hypertable_schema = current_schema()
       AND j.hypertable_name = 'call_events') AS compress_after,
    -- On disk now: every chunk's own relation (rows not compressed) plus the compressed
    -- parts; TimescaleDB's hypertable_size() says the same several times slower.
    pg_size_pretty((SELECT sum(pg_total_relation_size(format('%I.%I', c.chunk_schema, c.chunk_name)))
                    FROM timescaledb_information.chunks c
                    WHERE c.hypertable_schema = current_schema()
                      AND c.hypertable_name = 'call_events')
                   + COALESCE(s.after_compression_total_bytes, 0)) AS call_events_size
FROM hypertable_compression_stats('call_events') s;
\else
SELECT 'timescaledb is not installed: call_events is not compressed' AS note;
\endif
