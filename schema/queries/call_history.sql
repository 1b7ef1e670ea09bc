-- Call history: completed calls of the last 24 hours with their agent and latest transcription
-- (the seed's "efficient call history query", made hypertable-aware).
--
-- The lateral subquery bounds call_events by the call's own time range. Without that bound
-- it names no time, and on TimescaleDB every call probes every chunk (compressed ones
-- decompressed): 24 s on a year of history. With it, the chunks outside the range are
-- excluded at run time (ChunkAppend "Chunks excluded during runtime"), so each call reads
-- the one or two chunks that can hold its events. A call's events are stamped between its
-- initiation (calls.created_at) and its termination (calls.ended_at); a call still open is
-- bounded by now().
--
-- The transcription text is under event_data 'transcription' (the seed) or 'text' (what
-- `ingest produce` publishes).
SELECT
    c.id,
    c.from_number,
    c.to_number,
    c.duration,
    c.status,
    a.name AS agent_name,
    COALESCE(ce.event_data -> 'transcription', ce.event_data -> 'text') AS transcription
FROM calls c
LEFT JOIN agents a ON a.id = c.agent_id
LEFT JOIN LATERAL (
    SELECT e.event_data
    FROM call_events e
    WHERE e.call_id = c.id
      AND e.event_type = 'transcription'
      AND e.created_at >= c.created_at
      AND e.created_at <= COALESCE(c.ended_at, now())
      AND e.created_at > now() - INTERVAL '24 hours'
    ORDER BY e.created_at DESC
    LIMIT 1
) ce ON true
WHERE c.created_at > now() - INTERVAL '24 hours'
  AND c.status = 'completed'
ORDER BY c.created_at DESC;
