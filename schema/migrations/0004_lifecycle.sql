-- The data lifecycle of call_events: compression (columnstore) and its policy, an optional
-- retention policy, and the hourly aggregate the seed's analytics read (call_events_hourly).
--
-- On TimescaleDB (call_events is a hypertable, see 0001) call_events_hourly is a continuous
-- aggregate with a refresh policy and real-time aggregation; on plain PostgreSQL it is an
-- ordinary view with the same name and columns (plus an index on the hour), so the query
-- files in schema/queries/ run unchanged on both. Settings come from the migration runner
-- as transaction-local parameters: ingest.compress_after (INGEST_COMPRESS_AFTER, default
-- '7 days', 'off' = no compression policy) and ingest.retention (INGEST_RETENTION, default
-- 'off'). Every step is written to be harmless when it already exists.
--
-- Compression: no segmentby, orderby created_at DESC, bloom filters on call_id and id.
-- segmentby call_id was measured at 1.5x smaller (a call has ~6 events, so every
-- compressed batch held ~6 rows); with no segmentby, batches hold 1,000 rows (5.8x), the
-- created_at min/max of each batch skips batches outside a time range, and the bloom
-- filters let one call's events (the call-history query) and one event id (the worker's
-- duplicate lookup) decompress only the batch that can hold them.
--
-- call_events_hourly, one row per hour and event type:
--   events          events of that type whose created_at falls in the hour
--                   (initiation = calls started, termination = calls ended)
--   avg_duration_s  on the termination row: average calls.duration (seconds) of the calls
--                   whose closing termination falls in the hour
-- The duration comes from calls, not from event_data: producers need not send
-- duration_seconds (the worker then stores ended_at - created_at), and the join on
-- c.ended_at = e.created_at counts only the termination that closed the call. The worker
-- writes that calls row in the same transaction as the termination event, so a refresh
-- that sees the event sees the duration.

-- migrate:up
DO $$
DECLARE
    compress_after TEXT := COALESCE(NULLIF(current_setting('ingest.compress_after', true), ''),
                                    '7 days');
    retention TEXT := COALESCE(NULLIF(current_setting('ingest.retention', true), ''), 'off');
    hypertable BOOLEAN := false;
    -- How far back the aggregate's refresh looks: 30 days, and never as far as the
    -- retention (TimescaleDB's advice): a refresh over hours whose chunks were dropped
    -- empties those hours in the aggregate too (measured on 2.26 with
    -- refresh_continuous_aggregate), and the aggregate is what keeps them.
    refresh_window INTERVAL := INTERVAL '30 days';
BEGIN
    -- 0001 made call_events a hypertable exactly where TimescaleDB was available.
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        hypertable := EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                              WHERE hypertable_schema = current_schema()
                                AND hypertable_name = 'call_events');
    END IF;
    IF hypertable THEN
        ALTER TABLE call_events SET (
            timescaledb.compress,
            timescaledb.compress_segmentby = '',
            timescaledb.compress_orderby = 'created_at DESC',
            timescaledb.compress_index = 'bloom(call_id), bloom(id)'
        );
        IF lower(compress_after) <> 'off' THEN
            PERFORM add_compression_policy('call_events', compress_after::INTERVAL,
                                           if_not_exists => true);
        END IF;
        IF lower(retention) <> 'off' THEN
            PERFORM add_retention_policy('call_events', retention::INTERVAL,
                                         if_not_exists => true);
            refresh_window := least(refresh_window, retention::INTERVAL / 2);
        END IF;

        -- WITH NO DATA: a continuous aggregate cannot be filled inside a transaction; the
        -- refresh policy fills it. Real-time aggregation (materialized_only = false) adds
        -- what the policy has not materialized yet (the last hour or so) from call_events.
        EXECUTE $view$
            CREATE MATERIALIZED VIEW IF NOT EXISTS call_events_hourly
            WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
            SELECT time_bucket(INTERVAL '1 hour', e.created_at) AS bucket,
                   e.event_type,
                   count(*) AS events,
                   avg(extract(epoch FROM c.duration)) AS avg_duration_s
            FROM call_events e
            LEFT JOIN calls c ON c.id = e.call_id
                             AND c.ended_at = e.created_at
                             AND e.event_type = 'termination'
            GROUP BY 1, 2
            WITH NO DATA
        $view$;
        -- Refreshes recompute only invalidated buckets, so a 30-day window is cheap and
        -- takes late events of the last month (compressed chunks included) into account.
        PERFORM add_continuous_aggregate_policy('call_events_hourly',
            start_offset => refresh_window,
            end_offset => INTERVAL '1 hour',
            schedule_interval => INTERVAL '15 minutes',
            if_not_exists => true);
    ELSE
        -- Plain PostgreSQL: the same relation as a view. The index on the hour lets a bound
        -- on bucket (WHERE bucket > now() - ...) reach call_events through the view.
        CREATE INDEX IF NOT EXISTS idx_call_events_hour
            ON call_events (date_bin(INTERVAL '1 hour', created_at, TIMESTAMPTZ '2000-01-01 00:00:00+00'));
        -- The duration is looked up per termination (calls_pkey) rather than joined: a join
        -- hashed the whole calls table for seven days of events (626 ms on 180k calls).
        CREATE OR REPLACE VIEW call_events_hourly AS
            SELECT bucket, event_type, count(*) AS events, avg(duration_s) AS avg_duration_s
            FROM (
                SELECT date_bin(INTERVAL '1 hour', e.created_at,
                                TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
                       e.event_type,
                       CASE WHEN e.event_type = 'termination' THEN
                           (SELECT extract(epoch FROM c.duration) FROM calls c
                            WHERE c.id = e.call_id AND c.ended_at = e.created_at)
                       END AS duration_s
                FROM call_events e
            ) e
            GROUP BY bucket, event_type;
        -- Statistics of the new index expression: without them a bound on the hour is
        -- guessed to keep a third of the table and the planner avoids the index.
        ANALYZE call_events;
    END IF;
    GRANT SELECT ON call_events_hourly TO readonly_user;
END
$$;

-- migrate:down
-- Compression can only be switched off once no chunk is compressed: down decompresses every
-- compressed chunk first, which needs the disk space of the uncompressed data.
DO $$
DECLARE
    hypertable BOOLEAN := false;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        hypertable := EXISTS (SELECT 1 FROM timescaledb_information.hypertables
                              WHERE hypertable_schema = current_schema()
                                AND hypertable_name = 'call_events');
    END IF;
    IF hypertable THEN
        DROP MATERIALIZED VIEW IF EXISTS call_events_hourly;
        PERFORM remove_retention_policy('call_events', if_exists => true);
        PERFORM remove_compression_policy('call_events', if_exists => true);
        PERFORM decompress_chunk(c, if_compressed => true) FROM show_chunks('call_events') c;
        ALTER TABLE call_events SET (timescaledb.compress = false);
    ELSE
        DROP VIEW IF EXISTS call_events_hourly;
        DROP INDEX IF EXISTS idx_call_events_hour;
    END IF;
END
$$;
