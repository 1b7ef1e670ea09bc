-- The worker stages a batch that holds events stored before in a temporary table of its
-- session (a binary COPY, then one INSERT ... SELECT that skips the stored keys). PostgreSQL
-- grants TEMPORARY on a new database to PUBLIC, which hardened clusters revoke; the worker's
-- role gets it by name, as it gets CONNECT.

-- migrate:up
DO $$
BEGIN
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO ingest_writer', current_database());
END
$$;

-- migrate:down
DO $$
BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM ingest_writer', current_database());
END
$$;
