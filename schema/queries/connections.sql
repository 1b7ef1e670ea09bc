-- Connections by database, user and state (the seed's "SELECT * FROM pg_stat_activity",
-- summarised: how full the pools are and how long the oldest connection has been in its
-- state). Client backends only; background workers (TimescaleDB's jobs among them) are left
-- out.
SELECT
    datname,
    usename,
    COALESCE(application_name, '') AS application_name,
    state,
    count(*) AS connections,
    date_trunc('second', max(now() - state_change)) AS longest_in_state
FROM pg_stat_activity
WHERE backend_type = 'client backend'
GROUP BY datname, usename, application_name, state
ORDER BY connections DESC, datname, usename, state;
