"""A short account of what is stored: calls by status, events by type, positions by group."""

from __future__ import annotations

import asyncpg


async def summary(conn: asyncpg.Connection) -> str:
    """Human-readable tables of the stored calls and events."""
    calls = await conn.fetch(
        "SELECT status, count(*) AS n FROM calls GROUP BY status ORDER BY n DESC, status"
    )
    events = await conn.fetch(
        "SELECT event_type, count(*) AS n FROM call_events GROUP BY event_type "
        "ORDER BY n DESC, event_type"
    )
    lines = ["calls by status:"]
    lines += [f"  {r['status']:<20} {r['n']:>10}" for r in calls] or ["  (none)"]
    lines.append("events by type:")
    lines += [f"  {r['event_type']:<20} {r['n']:>10}" for r in events] or ["  (none)"]
    return "\n".join(lines)
