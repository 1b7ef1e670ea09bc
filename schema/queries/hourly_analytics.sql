-- Hourly analytics of the last 7 days: calls started per hour and the average duration of
-- the calls that ended in that hour (the seed's "efficient analytics query").
--
-- Reads call_events_hourly (migration 0004): on TimescaleDB a real-time continuous
-- aggregate (materialized hours plus the latest ones from call_events), on plain
-- PostgreSQL a view over call_events with an index on the hour; the same text runs on
-- both. The seed's time_bucket() over calls does not exist on plain PostgreSQL.
-- Deviation from the seed: the average is over calls that ended in the hour (their
-- termination event's hour), not over calls that started in it; see schema/README.md.
-- "now() - 7 days 1 hour" keeps the hour that contains the 7-day boundary.
SELECT
    bucket AS hour,
    COALESCE(sum(events) FILTER (WHERE event_type = 'initiation'), 0)::bigint AS call_count,
    round(max(avg_duration_s) FILTER (WHERE event_type = 'termination'), 1)
        AS avg_duration_seconds
FROM call_events_hourly
WHERE bucket > now() - INTERVAL '7 days 1 hour'
  AND event_type IN ('initiation', 'termination')
GROUP BY bucket
ORDER BY hour DESC;
