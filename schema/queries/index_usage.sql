-- Index usage (the seed's query; pg_stat_user_indexes names its columns relname and
-- indexrelname, not tablename and indexname). On TimescaleDB every chunk has its own copy
-- of each index of the hypertable: those are added up under the hypertable's index, so
-- call_events shows one row per index rather than one per chunk. A chunk index is named
-- after the chunk and ends with its hypertable index's name. Plain PostgreSQL has no
-- chunks, and the same text lists the indexes as they are.
WITH chunk_of AS (
    SELECT i.inhrelid AS chunk, i.inhparent AS hypertable
    FROM pg_inherits i
    JOIN pg_namespace n ON n.oid = (SELECT relnamespace FROM pg_class WHERE oid = i.inhrelid)
    WHERE n.nspname = '_timescaledb_internal'
),
usage AS (
    SELECT
        COALESCE(h.relid, s.relid) AS relid,
        COALESCE(h.indexrelid, s.indexrelid) AS indexrelid,
        s.idx_scan,
        s.idx_tup_read,
        s.idx_tup_fetch
    FROM pg_stat_user_indexes s
    LEFT JOIN chunk_of c ON c.chunk = s.relid
    LEFT JOIN LATERAL (
        SELECT hs.relid, hs.indexrelid
        FROM pg_stat_user_indexes hs
        WHERE hs.relid = c.hypertable
          AND right(s.indexrelname, length(hs.indexrelname)) = hs.indexrelname
        ORDER BY length(hs.indexrelname) DESC
        LIMIT 1
    ) h ON true
)
SELECT
    n.nspname AS schemaname,
    t.relname AS tablename,
    x.relname AS indexname,
    sum(u.idx_scan)::bigint AS idx_scan,
    sum(u.idx_tup_read)::bigint AS idx_tup_read,
    sum(u.idx_tup_fetch)::bigint AS idx_tup_fetch,
    count(*) AS copies
FROM usage u
JOIN pg_class t ON t.oid = u.relid
JOIN pg_class x ON x.oid = u.indexrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname NOT LIKE '\_timescaledb%'
GROUP BY n.nspname, t.relname, x.relname
ORDER BY idx_scan DESC, tablename, indexname;
