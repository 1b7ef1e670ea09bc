-- Events per type and hour over the last 24 hours, from call_events_hourly (migration 0004):
-- the continuous aggregate on TimescaleDB, a view with an index on the hour on PostgreSQL.
SELECT bucket AS hour, event_type, events
FROM call_events_hourly
WHERE bucket > now() - INTERVAL '25 hours'
ORDER BY hour DESC, event_type;
