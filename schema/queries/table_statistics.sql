-- Table statistics (the seed's query): live and dead rows and the last (auto)vacuum and
-- (auto)analyze. On TimescaleDB a hypertable's rows live in its chunks: they are added up
-- under the hypertable (`chunks` says how many). Rows of compressed chunks are not counted
-- here (PostgreSQL sees them as compressed batches); compression.sql has those numbers.
WITH parent_of AS (
    SELECT i.inhrelid AS chunk, i.inhparent AS parent
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = '_timescaledb_internal'
)
SELECT
    n.nspname AS schemaname,
    t.relname,
    sum(s.n_live_tup)::bigint AS n_live_tup,
    sum(s.n_dead_tup)::bigint AS n_dead_tup,
    max(s.last_vacuum) AS last_vacuum,
    max(s.last_autovacuum) AS last_autovacuum,
    max(s.last_analyze) AS last_analyze,
    max(s.last_autoanalyze) AS last_autoanalyze,
    count(p.chunk) AS chunks
FROM pg_stat_user_tables s
LEFT JOIN parent_of p ON p.chunk = s.relid
JOIN pg_class t ON t.oid = COALESCE(p.parent, s.relid)
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname NOT LIKE '\_timescaledb%'
GROUP BY n.nspname, t.relname
ORDER BY n_live_tup DESC, relname;
