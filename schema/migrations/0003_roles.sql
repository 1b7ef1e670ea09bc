-- Least privilege: ingest_writer can do exactly what the worker needs; readonly_user is the
-- seed's read-only role. Both are NOLOGIN group roles unless configured: give the worker a
-- login role IN ROLE ingest_writer; readonly_user logs in only when INGEST_READONLY_PASSWORD
-- is set (the runner passes it as a transaction-local parameter, never as a literal here).
-- Roles are cluster-wide: 'down' revokes this database's grants and keeps the roles.

-- migrate:up
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ingest_writer') THEN
        CREATE ROLE ingest_writer NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'readonly_user') THEN
        CREATE ROLE readonly_user NOLOGIN CONNECTION LIMIT 5;
    END IF;
    IF COALESCE(current_setting('ingest.readonly_password', true), '') <> '' THEN
        EXECUTE format('ALTER ROLE readonly_user WITH LOGIN PASSWORD %L',
                       current_setting('ingest.readonly_password'));
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO ingest_writer, readonly_user',
                   current_database());
END
$$;

GRANT USAGE ON SCHEMA public TO ingest_writer, readonly_user;
GRANT SELECT, INSERT ON call_events TO ingest_writer;
GRANT SELECT, INSERT, UPDATE ON calls TO ingest_writer;
GRANT SELECT ON agents TO ingest_writer;
GRANT UPDATE (last_used_at) ON agents TO ingest_writer;
GRANT SELECT, INSERT, UPDATE ON ingest_consumer_offsets TO ingest_writer;
GRANT SELECT ON users, agents, calls, call_events TO readonly_user;

-- migrate:down
REVOKE ALL ON users, agents, calls, call_events, ingest_consumer_offsets
    FROM ingest_writer, readonly_user;
REVOKE USAGE ON SCHEMA public FROM ingest_writer, readonly_user;
DO $$
BEGIN
    EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM ingest_writer, readonly_user',
                   current_database());
END
$$;
