"""When a database session drops its cached plans (``DISCARD PLANS``)."""

from __future__ import annotations

import math

from ingest.pipeline.sink import REPLAN_EVERY_S, REPLAN_FIRST_S, replan_due


def test_a_session_never_replanned_replans_at_once():
    assert replan_due(100.0, 100.0, -math.inf)


def test_a_young_session_replans_after_the_shortest_interval():
    assert not replan_due(100.0 + REPLAN_FIRST_S / 2, 100.0, 100.0)
    assert replan_due(100.0 + REPLAN_FIRST_S, 100.0, 100.0)


def test_the_interval_is_half_the_sessions_age():
    first = 100.0
    assert not replan_due(first + 2.0, first, first + 1.5)  # age 2 s: every 1 s
    assert replan_due(first + 2.0, first, first + 1.0)


def test_an_old_session_replans_every_replan_every_s_at_most():
    first = 0.0
    now = 1000.0
    assert not replan_due(now, first, now - REPLAN_EVERY_S + 0.1)
    assert replan_due(now, first, now - REPLAN_EVERY_S)
