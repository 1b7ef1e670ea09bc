-- The seed's four tables, constraints and indexes, with the changes schema/README.md explains:
-- agents before calls, call_events keyed by (id, created_at), calls a plain table.

-- migrate:up
CREATE TABLE users (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    email VARCHAR(255) NOT NULL UNIQUE,
    full_name VARCHAR(255) NOT NULL,
    password_hash VARCHAR(255) NOT NULL,
    role VARCHAR(50) NOT NULL DEFAULT 'user',
    status VARCHAR(50) NOT NULL DEFAULT 'active',
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    last_login_at TIMESTAMPTZ,
    CONSTRAINT valid_email CHECK (email ~* '^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$')
);

CREATE TABLE agents (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    name VARCHAR(255) NOT NULL,
    voice_model VARCHAR(100) NOT NULL,
    language VARCHAR(10)[] NOT NULL DEFAULT ARRAY['en-US'],
    context_prompt TEXT NOT NULL,
    active BOOLEAN NOT NULL DEFAULT true,
    success_rate FLOAT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    last_used_at TIMESTAMPTZ,
    configuration JSONB NOT NULL DEFAULT '{}'::jsonb
);

-- A plain table, not a hypertable: call_events (a hypertable) references it, and
-- TimescaleDB refuses a hypertable as the target of a hypertable's foreign key.
CREATE TABLE calls (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    from_number VARCHAR(20) NOT NULL,
    to_number VARCHAR(20) NOT NULL,
    duration INTERVAL,
    status VARCHAR(50) NOT NULL DEFAULT 'initiated',
    recording_url TEXT,
    transcript TEXT,
    sentiment_score FLOAT,
    cost_cents INTEGER,
    agent_id UUID REFERENCES agents(id),
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    ended_at TIMESTAMPTZ,
    CONSTRAINT valid_phone_numbers CHECK (
        from_number ~* '^\+[1-9]\d{1,14}$' AND
        to_number ~* '^\+[1-9]\d{1,14}$'
    )
);

-- The key holds the partitioning column, as a hypertable's unique indexes must.
CREATE TABLE call_events (
    id UUID NOT NULL DEFAULT gen_random_uuid(),
    call_id UUID NOT NULL REFERENCES calls(id),
    event_type VARCHAR(50) NOT NULL,
    event_data JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
    CONSTRAINT call_events_pkey PRIMARY KEY (id, created_at),
    CONSTRAINT valid_event_type CHECK (
        event_type IN ('initiation', 'answer', 'transcription', 'response', 'error', 'termination')
    )
);

-- Hypertable only where TimescaleDB can load (installed, or available and preloaded);
-- the chunk interval comes from the migration runner (INGEST_CHUNK_INTERVAL).
DO $$
DECLARE
    chunk INTERVAL := COALESCE(NULLIF(current_setting('ingest.chunk_interval', true), ''),
                               '1 day')::INTERVAL;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
       OR (EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')
           AND current_setting('shared_preload_libraries') ILIKE '%timescaledb%') THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        EXECUTE format(
            'SELECT create_hypertable(%L::regclass, by_range(%L, %L::interval), '
            'create_default_indexes => false, if_not_exists => true)',
            'call_events', 'created_at', chunk);
    END IF;
END
$$;

CREATE INDEX idx_users_email ON users(email);
CREATE INDEX idx_users_status ON users(status);

CREATE INDEX idx_calls_created_at ON calls(created_at DESC);
CREATE INDEX idx_calls_status ON calls(status);
CREATE INDEX idx_calls_from_number ON calls(from_number);
CREATE INDEX idx_calls_to_number ON calls(to_number);
CREATE INDEX idx_calls_agent_id ON calls(agent_id);

CREATE INDEX idx_agents_active ON agents(active);
CREATE INDEX idx_agents_voice_model ON agents(voice_model);
CREATE INDEX idx_agents_success_rate ON agents(success_rate DESC);

CREATE INDEX idx_call_events_call_id ON call_events(call_id);
CREATE INDEX idx_call_events_type ON call_events(event_type);
CREATE INDEX idx_call_events_created_at ON call_events(created_at DESC);

-- migrate:down
DROP TABLE call_events;
DROP TABLE calls;
DROP TABLE agents;
DROP TABLE users;
