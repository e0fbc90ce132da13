"""The router with the real twilio client against the phone-network simulator, driven by a
clock the test moves: rosters in Asia/Shanghai, fallback up the tree, steps and fencing."""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from alerts import attempts
from alerts.attempts import LEASE_S, claim, settle
from alerts.notifiers.base import SendOutcome, SendResult
from alerts.recipients import Rosters, shift_covers
from alerts.router import PRESS_TO_FIRST_REQUEST
from devices.kinds import Channel, EscalationTarget
from tests.support.escalation import (
    DAY,
    NIGHT,
    ZONE,
    Clock,
    calls,
    grid_worker_shifts,
    make_router,
    messages,
    press,
    q,
    wristband_in,
)


def test_first_step_calls_and_texts_the_grid_worker_on_duty(county_url: str, phone_network: str) -> None:
    device, grid, _resident = wristband_in(county_url, night_covered=False)
    day_worker = next(p for _s, p, start, end in grid_worker_shifts(county_url)[grid] if start < end)
    clock = Clock(DAY)
    incident = press(county_url, device, DAY)
    before = next(iter(PRESS_TO_FIRST_REQUEST.collect())).samples
    make_router(county_url, phone_network, clock).run_once()
    assert [c["to"] for c in calls(phone_network)] == [day_worker]
    assert [m["to"] for m in messages(phone_network)] == [day_worker]
    attempts = q(county_url, "SELECT channel, state, provider_id FROM notification_attempts ORDER BY id")
    assert [(a[0], a[1]) for a in attempts] == [("voice", "sent"), ("sms", "sent"), ("console", "sent")]
    # An incident alone leads with its call (the SMS went out at once too: nothing else waited).
    assert q(county_url, "SELECT channel FROM notification_attempts WHERE NOT behind_sibling ORDER BY id") == [
        ("voice",),
        ("console",),
    ]
    assert attempts[0][2] == calls(phone_network)[0]["sid"]
    code = q(county_url, "SELECT code FROM incidents WHERE id = %s", incident)[0][0]
    assert code in messages(phone_network)[0]["body"]
    timeline = [
        r[0] for r in q(county_url, "SELECT event FROM incident_events WHERE incident_id = %s ORDER BY id", incident)
    ]
    assert timeline == ["opened", "stored", "step_started", "attempt_sent", "attempt_sent", "attempt_sent"]
    assert q(county_url, "SELECT step, state, due_at FROM escalation_actions ORDER BY id") == [
        (0, "done", DAY),
        (1, "pending", DAY + timedelta(seconds=120)),
    ]
    after = next(iter(PRESS_TO_FIRST_REQUEST.collect())).samples
    count = next(s.value for s in after if s.name.endswith("_count"))
    assert count == next(s.value for s in before if s.name.endswith("_count")) + 1


def test_grid_with_nobody_on_duty_pages_the_duty_officer_above(county_url: str, phone_network: str) -> None:
    device, grid, _resident = wristband_in(county_url, night_covered=False)
    township = q(
        county_url,
        """
        WITH RECURSIVE up(id, parent_id, level) AS (
            SELECT id, parent_id, level FROM areas WHERE id = %s
            UNION ALL SELECT a.id, a.parent_id, a.level FROM areas a JOIN up ON a.id = up.parent_id)
        SELECT id FROM up WHERE level = 'township'""",
        grid,
    )[0][0]
    officers = {
        r[0]
        for r in q(
            county_url,
            """
        SELECT s.phone FROM duty_shifts d JOIN staff s ON s.id = d.staff_id
        WHERE d.area_id = %s AND s.role = 'duty_officer' AND d.start_time > d.end_time""",
            township,
        )
    }
    press(county_url, device, NIGHT)
    make_router(county_url, phone_network, Clock(NIGHT)).run_once()
    called = {c["to"] for c in calls(phone_network)}
    assert called
    assert called <= officers
    step = q(county_url, "SELECT detail FROM incident_events WHERE event = 'step_started'")[0][0]
    assert {r["role"] for r in step["recipients"]} == {"duty_officer"}


def test_guardians_are_called_in_priority_order_after_the_wait(county_url: str, phone_network: str) -> None:
    device, _grid, resident = wristband_in(county_url, night_covered=False)
    guardians = [
        r[0] for r in q(county_url, "SELECT phone FROM guardians WHERE resident_id = %s ORDER BY priority", resident)
    ]
    clock = Clock(DAY)
    press(county_url, device, DAY)
    router = make_router(county_url, phone_network, clock)
    router.run_once()
    first_calls = len(calls(phone_network))
    clock.advance(119)
    router.run_once()
    assert len(calls(phone_network)) == first_calls  # not before its time
    clock.advance(1)
    router.run_once()
    assert [c["to"] for c in calls(phone_network)[first_calls:]] == guardians


def test_a_step_without_recipients_advances_at_once_and_the_chain_repeats(county_url: str, phone_network: str) -> None:
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    operators = {r[0] for r in q(county_url, "SELECT phone FROM staff WHERE role = 'operator'")}
    clock = Clock(DAY)
    incident = press(county_url, device, DAY)
    router = make_router(county_url, phone_network, clock)
    router.run_once()
    clock.advance(120)
    router.run_once()  # guardians
    clock.advance(120)
    before = len(calls(phone_network))
    router.run_once()  # the platform step has no notifier yet: no_recipients, then operators at once
    assert {c["to"] for c in calls(phone_network)[before:]} <= operators
    assert len(calls(phone_network)) > before
    clock.advance(120)
    router.run_once()  # every step done: unreached, operators alarmed, round 1 from the grid worker
    state = q(county_url, "SELECT state FROM incidents WHERE id = %s", incident)[0][0]
    assert state == "unreached"
    events = [
        r[0] for r in q(county_url, "SELECT event FROM incident_events WHERE incident_id = %s ORDER BY id", incident)
    ]
    assert "no_recipients" in events
    assert "unreached" in events
    rounds = q(county_url, "SELECT DISTINCT round FROM notification_attempts WHERE step = 0 ORDER BY 1")
    assert rounds == [(0,), (1,)]


def test_a_stale_or_closed_incident_pages_nobody(county_url: str, phone_network: str) -> None:
    first, _g, _r = wristband_in(county_url, night_covered=False)
    second, _g2, _r2 = wristband_in(county_url, night_covered=True)
    stale = press(county_url, first, DAY)
    closed = press(county_url, second, DAY)
    with psycopg.connect(county_url) as conn:
        conn.execute("UPDATE incidents SET escalation_token = 2 WHERE id = %s", (stale,))
        conn.execute("UPDATE incidents SET state = 'acknowledged' WHERE id = %s", (closed,))
    make_router(county_url, phone_network, Clock(DAY)).run_once()
    assert calls(phone_network) == []
    assert sorted(r[0] for r in q(county_url, "SELECT state FROM escalation_actions")) == ["cancelled", "stale"]


def test_a_provider_failure_is_recorded_not_raised(county_url: str, phone_network: str) -> None:
    device, grid, _resident = wristband_in(county_url, night_covered=False)
    day_worker = next(p for _s, p, start, end in grid_worker_shifts(county_url)[grid] if start < end)
    httpx.post(f"{phone_network}/_sim/faults", json={"to": day_worker, "fail": "error"})
    incident = press(county_url, device, DAY)
    make_router(county_url, phone_network, Clock(DAY)).run_once()
    failed = q(county_url, "SELECT channel, error FROM notification_attempts WHERE state = 'failed' ORDER BY id")
    assert [f[0] for f in failed] == ["voice", "sms"]
    assert all("20500" in (f[1] or "") for f in failed)
    events = [r[0] for r in q(county_url, "SELECT event FROM incident_events WHERE incident_id = %s", incident)]
    assert events.count("attempt_failed") == 2


def test_two_routers_send_each_attempt_once(county_url: str, phone_network: str) -> None:
    devices = [r[0] for r in q(county_url, "SELECT id FROM devices WHERE kind = 'wristband' ORDER BY id LIMIT 12")]
    for device in devices:
        press(county_url, device, DAY, msg_id=f"m-{device}")
    clock = Clock(DAY)
    routers = [make_router(county_url, phone_network, clock, name) for name in ("a", "b")]
    threads = [threading.Thread(target=r.run_once) for r in routers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    phone_attempts = q(county_url, "SELECT count(*) FROM notification_attempts WHERE channel <> 'console'")[0][0]
    sids = [c["sid"] for c in calls(phone_network)] + [m["sid"] for m in messages(phone_network)]
    assert len(sids) == phone_attempts
    assert q(county_url, "SELECT count(*) FROM notification_attempts WHERE state <> 'sent'") == [(0,)]
    assert q(county_url, "SELECT count(*) FROM escalation_actions WHERE step = 0 AND state = 'done'") == [(12,)]


def test_failed_pages_are_retried_with_backoff_then_the_step_moves_on(county_url: str, phone_network: str) -> None:
    device, grid, resident = wristband_in(county_url, night_covered=False)
    day_worker = next(p for _s, p, start, end in grid_worker_shifts(county_url)[grid] if start < end)
    httpx.post(f"{phone_network}/_sim/faults", json={"to": day_worker, "fail": "error"})
    clock = Clock(DAY)
    press(county_url, device, DAY)
    router = make_router(county_url, phone_network, clock)
    router.run_once()
    tries = (
        "SELECT channel, attempt, state FROM notification_attempts"
        " WHERE address = %s AND purpose = 'page' AND channel <> 'console' ORDER BY id"
    )
    assert q(county_url, tries, day_worker) == [
        ("voice", 1, "failed"),
        ("sms", 1, "failed"),
        ("voice", 2, "pending"),
        ("sms", 2, "pending"),
    ]
    clock.advance(19)
    router.run_once()
    assert len(q(county_url, tries, day_worker)) == 4  # not before the backoff
    clock.advance(1)
    router.run_once()
    clock.advance(60)
    router.run_once()
    assert [r[1:] for r in q(county_url, tries, day_worker)] == [
        (1, "failed"),
        (1, "failed"),
        (2, "failed"),
        (2, "failed"),
        (3, "failed"),
        (3, "failed"),
    ]
    # Every channel of step 0 failed its last try at 80 s: the guardians are paged now, not at 120 s.
    guardians = {r[0] for r in q(county_url, "SELECT phone FROM guardians WHERE resident_id = %s", resident)}
    assert guardians <= {c["to"] for c in calls(phone_network)}
    events = [r[0] for r in q(county_url, "SELECT event FROM incident_events ORDER BY id")]
    assert events.count("retry_scheduled") == 4
    assert events.count("channel_given_up") == 2
    assert "step_advanced" in events


def _walk_up_the_tree(url: str, target: EscalationTarget, area_id: str, at: datetime) -> list[str]:
    """The staff ids a step meant before steps were batched: one query per level, then the rule."""
    local = at.astimezone(ZONE)
    with psycopg.connect(url) as conn:
        levels: list[tuple[str, set[str] | None]]
        if target is EscalationTarget.OPERATORS:
            levels = [
                (r[0], {"operator"})
                for r in conn.execute(
                    "SELECT DISTINCT sa.area_id FROM staff s JOIN staff_areas sa ON sa.staff_id = s.id"
                    " WHERE s.role = 'operator' AND s.active ORDER BY 1"
                )
            ]
        else:
            chain = conn.execute(
                """
                WITH RECURSIVE up(id, parent_id, depth) AS (
                    SELECT id, parent_id, 0 FROM areas WHERE id = %s
                    UNION ALL SELECT a.id, a.parent_id, up.depth + 1 FROM areas a JOIN up ON a.id = up.parent_id)
                SELECT id FROM up ORDER BY depth""",
                (area_id,),
            ).fetchall()
            levels = [(r[0], {"grid_worker"} if depth == 0 else None) for depth, r in enumerate(chain)]
        found: list[str] = []
        for level, roles in levels:
            for staff, role, weekdays, start, end in conn.execute(
                "SELECT s.id, s.role, d.weekdays, d.start_time, d.end_time FROM duty_shifts d"
                " JOIN staff s ON s.id = d.staff_id WHERE d.area_id = %s AND d.active AND s.active ORDER BY s.id",
                (level,),
            ):
                if (roles is None or role in roles) and shift_covers(list(weekdays), start, end, local):
                    found += [] if staff in found else [staff]
            if found and target is EscalationTarget.GRID_WORKER:
                return found
        return found


def test_rosters_read_for_a_batch_match_the_walk_up_the_tree(county_url: str) -> None:
    grids = [r[0] for r in q(county_url, "SELECT id FROM areas WHERE level = 'grid' ORDER BY id")]
    for at in (DAY, NIGHT, NIGHT + timedelta(hours=20)):
        with psycopg.connect(county_url) as conn:
            rosters = Rosters(conn, at, ZONE)
            wanted = [(EscalationTarget.GRID_WORKER, None, g) for g in grids] + [
                (EscalationTarget.OPERATORS, None, None)
            ]
            rosters.prepare(wanted)
            batched = {g: [p.id for p in rosters.resolve(t, resident_id=None, area_id=g)] for t, _r, g in wanted}
        for target, _r, grid in wanted:
            assert batched[grid] == _walk_up_the_tree(county_url, target, grid or "", at), (target, grid, at)


def test_many_due_steps_run_in_a_few_statements_each_as_if_alone(
    county_url: str, phone_network: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    devices = [r[0] for r in q(county_url, "SELECT id FROM devices WHERE kind = 'wristband' ORDER BY id LIMIT 30")]
    incidents = [press(county_url, device, DAY, msg_id=f"m-{device}") for device in devices]
    router = make_router(county_url, phone_network, Clock(DAY))
    statements = 0
    execute = psycopg.Connection.execute

    def counting(self: psycopg.Connection[Any], *args: Any, **kwargs: Any) -> Any:
        nonlocal statements
        statements += 1
        return execute(self, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", counting)
    assert router.run_due_steps() == 30
    monkeypatch.undo()
    assert statements <= 2 * 12  # two batches; one step a transaction took about 12 each
    for incident in incidents:
        area = q(county_url, "SELECT area_id FROM incidents WHERE id = %s", incident)[0][0]
        started = q(
            county_url, "SELECT detail FROM incident_events WHERE incident_id = %s AND event = 'step_started'", incident
        )
        assert [r["id"] for r in started[0][0]["recipients"]] == _walk_up_the_tree(
            county_url, EscalationTarget.GRID_WORKER, area, DAY
        )
        assert q(
            county_url,
            "SELECT step, state, due_at FROM escalation_actions WHERE incident_id = %s ORDER BY id",
            incident,
        ) == [
            (0, "done", DAY),
            (1, "pending", DAY + timedelta(seconds=120)),
        ]


def test_a_second_due_action_of_an_incident_waits_for_the_next_batch(county_url: str, phone_network: str) -> None:
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    incident = press(county_url, device, DAY)
    with psycopg.connect(county_url) as conn:  # e.g. a hand edit: step 1 due as well
        conn.execute(
            "INSERT INTO escalation_actions (incident_id, step, round, token, due_at) VALUES (%s, 1, 0, 1, %s)",
            (incident, DAY),
        )
    make_router(county_url, phone_network, Clock(DAY)).run_due_steps()
    assert q(county_url, "SELECT step, state FROM escalation_actions WHERE incident_id = %s ORDER BY id", incident) == [
        (0, "done"),
        (1, "done"),
        (2, "pending"),
    ]
    events = [
        r[0] for r in q(county_url, "SELECT event FROM incident_events WHERE incident_id = %s ORDER BY id", incident)
    ]
    assert events.count("step_started") == 2


def test_a_grid_with_nobody_reachable_pages_the_guardians_at_once(county_url: str, phone_network: str) -> None:
    device, grid, resident = wristband_in(county_url, night_covered=False)
    with psycopg.connect(county_url) as conn:
        # Everyone who could be on duty for this grid, up to the county: the grid's own
        # workers and any staff rostered on the community, township or county above it.
        conn.execute(
            """
            WITH RECURSIVE up(id, parent_id) AS (
                SELECT id, parent_id FROM areas WHERE id = %s
                UNION ALL SELECT a.id, a.parent_id FROM areas a JOIN up ON a.id = up.parent_id)
            UPDATE staff SET active = false
            WHERE id IN (SELECT staff_id FROM duty_shifts WHERE area_id IN (SELECT id FROM up))
            """,
            (grid,),
        )
    guardians = [
        r[0] for r in q(county_url, "SELECT phone FROM guardians WHERE resident_id = %s ORDER BY priority", resident)
    ]
    assert guardians
    clock = Clock(DAY)
    incident = press(county_url, device, DAY)

    make_router(county_url, phone_network, clock).run_once()  # the clock never moves

    assert [c["to"] for c in calls(phone_network)] == guardians
    timeline = q(
        county_url,
        "SELECT event, at, detail->>'step', detail->>'target' FROM incident_events"
        " WHERE incident_id = %s AND event IN ('no_recipients', 'step_started') ORDER BY id",
        incident,
    )
    assert timeline == [("no_recipients", DAY, "0", "grid_worker"), ("step_started", DAY, "1", "guardians")]
    assert q(county_url, "SELECT step, state, due_at FROM escalation_actions ORDER BY id") == [
        (0, "done", DAY),
        (1, "done", DAY),
        (2, "pending", DAY + timedelta(seconds=120)),
    ]
    assert q(county_url, "SELECT count(*) FROM notification_attempts WHERE step = 0") == [(0,)]


def test_a_provider_that_recovers_by_the_third_try_keeps_the_step_to_its_wait(
    county_url: str, phone_network: str
) -> None:
    device, grid, resident = wristband_in(county_url, night_covered=False)
    day_worker = next(p for _s, p, start, end in grid_worker_shifts(county_url)[grid] if start < end)
    # The first two tries of the call and of the SMS (four requests) meet a provider error.
    httpx.post(f"{phone_network}/_sim/faults", json={"to": day_worker, "fail": "error", "times": 4}).raise_for_status()
    guardians = {r[0] for r in q(county_url, "SELECT phone FROM guardians WHERE resident_id = %s", resident)}
    clock = Clock(DAY)
    incident = press(county_url, device, DAY)
    router = make_router(county_url, phone_network, clock)
    tries = (
        "SELECT channel, attempt, state, not_before FROM notification_attempts"
        " WHERE address = %s AND channel IN ('voice', 'sms') ORDER BY attempt, channel"
    )

    router.run_once()  # 0 s
    clock.advance(20)
    router.run_once()  # 20 s
    clock.advance(59)
    router.run_once()  # 79 s: the third tries are not due yet
    assert [r[:3] for r in q(county_url, tries, day_worker)] == [
        ("sms", 1, "failed"),
        ("voice", 1, "failed"),
        ("sms", 2, "failed"),
        ("voice", 2, "failed"),
        ("sms", 3, "pending"),
        ("voice", 3, "pending"),
    ]
    assert {r[3] for r in q(county_url, tries, day_worker)[2:]} == {
        DAY + timedelta(seconds=20),
        DAY + timedelta(seconds=80),
    }
    clock.advance(1)
    router.run_once()  # 80 s: the third tries go through
    assert [r[2] for r in q(county_url, tries, day_worker)[4:]] == ["sent", "sent"]
    assert [c["to"] for c in calls(phone_network)] == [day_worker]  # the only call the network accepted

    clock.advance(39)
    router.run_once()  # 119 s: the grid worker may yet answer, so the guardians wait
    assert not guardians & {c["to"] for c in calls(phone_network)}
    clock.advance(1)
    router.run_once()  # 120 s: the step's own wait
    assert guardians <= {c["to"] for c in calls(phone_network)}
    events = [r[0] for r in q(county_url, "SELECT event FROM incident_events WHERE incident_id = %s", incident)]
    assert events.count("retry_scheduled") == 4
    assert "channel_given_up" not in events
    assert "step_advanced" not in events


def test_calls_and_texts_carry_no_medical_notes(county_url: str, phone_network: str) -> None:
    """PIPL: a page says who, where and how to call back — never the resident's health."""
    device, _grid, resident = wristband_in(county_url, night_covered=False)
    notes = "心脏起搏器，青霉素过敏"
    with psycopg.connect(county_url) as conn:
        conn.execute("UPDATE residents SET medical_notes = %s WHERE id = %s", (notes, resident))
    clock = Clock(DAY)
    press(county_url, device, DAY)
    router = make_router(county_url, phone_network, clock)
    router.run_once()
    clock.advance(120)
    router.run_once()  # the guardians too
    sent = [m["body"] for m in messages(phone_network)] + [c["twiml"] or "" for c in calls(phone_network)]
    assert len(sent) >= 4
    for text in sent:
        assert "起搏器" not in text
        assert "过敏" not in text


def test_two_routers_over_several_steps_run_each_action_once(county_url: str, phone_network: str) -> None:
    """Two routers racing through three steps of twelve escalations: every step runs
    once (one step_started per incident and step), every attempt is sent once."""
    devices = [r[0] for r in q(county_url, "SELECT id FROM devices WHERE kind = 'wristband' ORDER BY id LIMIT 12")]
    for device in devices:
        press(county_url, device, DAY, msg_id=f"m-{device}")
    clock = Clock(DAY)
    routers = [make_router(county_url, phone_network, clock, name) for name in ("a", "b")]
    for _step in range(3):
        threads = [threading.Thread(target=r.run_once) for r in routers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        clock.advance(120)
    started = q(
        county_url,
        "SELECT incident_id, detail->>'step', count(*) FROM incident_events WHERE event = 'step_started' GROUP BY 1, 2",
    )
    assert len(started) >= 12 * 2  # grid workers and guardians at least, for all twelve
    assert {count for _i, _s, count in started} == {1}
    done = q(
        county_url,
        "SELECT incident_id, step, round, count(*) FROM escalation_actions WHERE state = 'done' GROUP BY 1, 2, 3",
    )
    assert {count for *_key, count in done} == {1}
    phone_attempts = q(county_url, "SELECT count(*) FROM notification_attempts WHERE channel IN ('voice', 'sms')")[0][0]
    sids = [c["sid"] for c in calls(phone_network)] + [m["sid"] for m in messages(phone_network)]
    assert len(sids) == phone_attempts
    assert len(set(sids)) == len(sids)


def test_a_result_after_the_lease_was_taken_over_is_logged_late_not_recorded(
    county_url: str, phone_network: str
) -> None:
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    incident = press(county_url, device, DAY)
    make_router(county_url, phone_network, Clock(DAY)).run_due_steps()
    later = DAY + timedelta(seconds=LEASE_S + 1)
    with psycopg.connect(county_url) as conn:
        with conn.transaction():
            [lost] = claim(conn, (Channel.VOICE,), DAY, "r-old")
        with conn.transaction():
            [taken] = claim(conn, (Channel.VOICE,), later, "r-new")
        assert (taken.attempt_id, taken.sends) == (lost.attempt_id, 2)
        with conn.transaction():
            assert settle(conn, lost, SendResult(SendOutcome.SENT, provider_id="CA-old"), later, "r-old", {}) is None
        with conn.transaction():
            result = SendResult(SendOutcome.SENT, provider_id="CA-new")
            assert settle(conn, taken, result, later, "r-new", {"channel": "voice"}) == "sent"
    assert q(
        county_url, "SELECT state, provider_id, leased_by FROM notification_attempts WHERE id = %s", lost.attempt_id
    ) == [("sent", "CA-new", None)]
    events = q(
        county_url,
        "SELECT event, actor, detail FROM incident_events WHERE incident_id = %s"
        " AND (detail->>'attempt_id')::bigint = %s ORDER BY id",
        incident,
        lost.attempt_id,
    )
    assert events == [
        ("attempt_resent", "r-new", {"attempt_id": lost.attempt_id, "sends": 2}),
        ("attempt_result_late", "r-old", {"attempt_id": lost.attempt_id, "outcome": "sent", "provider_id": "CA-old"}),
        (
            "attempt_sent",
            "r-new",
            {"channel": "voice", "attempt_id": lost.attempt_id, "provider_id": "CA-new", "error": None},
        ),
    ]


def test_a_successful_settle_waits_for_the_incident_before_it_touches_the_attempt(
    county_url: str, phone_network: str
) -> None:
    """The lock order incident → attempts, kept by the one-statement settle of a success:
    while an acknowledgement holds the incident FOR UPDATE, a settle on an autocommit
    connection (the router's) waits for it without having locked the attempt's row, so
    the acknowledgement can still update that attempt (no deadlock); then it records."""
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    incident = press(county_url, device, DAY)
    make_router(county_url, phone_network, Clock(DAY)).run_due_steps()
    with psycopg.connect(county_url, autocommit=True) as sender, psycopg.connect(county_url) as ack:
        with sender.transaction():
            [lease] = claim(sender, (Channel.VOICE,), DAY, "r-1")
        ack.execute("SELECT id FROM incidents WHERE id = %s FOR UPDATE", (incident,))
        outcome: list[str | None] = []
        settling = threading.Thread(
            target=lambda: outcome.append(
                settle(sender, lease, SendResult(SendOutcome.SENT, provider_id="CA-1"), DAY, "r-1", {})
            )
        )
        settling.start()
        waiting = "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s"
        deadline = time.monotonic() + 10
        while ack.execute(waiting, (sender.info.backend_pid,)).fetchone() != ("Lock",):
            assert time.monotonic() < deadline, "the settle never waited for the incident"
            time.sleep(0.01)
        row = ack.execute(
            "SELECT id FROM notification_attempts WHERE id = %s FOR UPDATE NOWAIT", (lease.attempt_id,)
        ).fetchone()
        assert row == (lease.attempt_id,)  # NOWAIT: had the settle locked it first, this would raise
        ack.commit()
        settling.join(10)
    assert outcome == ["sent"]


def test_a_failed_send_is_not_settled_outside_a_transaction(county_url: str, phone_network: str) -> None:
    """A failure's settle may retry, fall back or advance the step under the incident's
    FOR UPDATE: on an autocommit connection with no transaction open that lock would end
    with its statement, so it is refused and nothing is recorded."""
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    press(county_url, device, DAY)
    make_router(county_url, phone_network, Clock(DAY)).run_due_steps()
    with psycopg.connect(county_url, autocommit=True) as sender:
        with sender.transaction():
            [lease] = claim(sender, (Channel.VOICE,), DAY, "r-1")
        with pytest.raises(RuntimeError, match="in a transaction"):
            settle(sender, lease, SendResult(SendOutcome.FAILED, error="busy"), DAY, "r-1", {})
        with sender.transaction():
            assert settle(sender, lease, SendResult(SendOutcome.FAILED, error="busy"), DAY, "r-1", {}) == "failed"


def test_each_incident_leads_with_one_first_page_so_call_and_sms_senders_page_different_incidents(
    county_url: str, phone_network: str
) -> None:
    """A mass event (issue 13): each incident's first step has one leading page — the
    call and the SMS alternating over the incidents whose steps run together — and its
    other first pages wait behind every leading page (``behind_sibling``, set when the
    step writes them). The call senders and the SMS senders, claiming at the same time,
    each the oldest first page of its channel, so page different incidents: every
    incident has one page out before any has two. (Marked when a page was leased instead, two senders leasing an
    incident's call and SMS at once each saw the other's row locked and both went.)"""
    devices = [r[0] for r in q(county_url, "SELECT id FROM devices WHERE kind = 'wristband' ORDER BY id LIMIT 12")]
    incidents = [press(county_url, device, DAY, msg_id=f"m-{device}") for device in devices]
    make_router(county_url, phone_network, Clock(DAY)).run_due_steps()
    leading = q(
        county_url,
        "SELECT incident_id, channel FROM notification_attempts"
        " WHERE step = 0 AND round = 0 AND channel IN ('voice', 'sms') AND NOT behind_sibling ORDER BY incident_id",
    )
    assert leading == [(incident, ("voice", "sms")[n % 2]) for n, incident in enumerate(sorted(incidents))]
    phone_pages = q(county_url, "SELECT count(*) FROM notification_attempts WHERE channel IN ('voice', 'sms')")[0][0]
    claimed: list[tuple[Channel, int]] = []
    with psycopg.connect(county_url) as calls_pool, psycopg.connect(county_url) as sms_pool:
        while True:
            # Both pools claim inside open transactions: neither sees the other's lease.
            with calls_pool.transaction(), sms_pool.transaction():
                took = [
                    (channel, lease.incident_id)
                    for channel, conn in ((Channel.VOICE, calls_pool), (Channel.SMS, sms_pool))
                    for lease in claim(conn, (channel,), DAY, f"sender-{channel}", first_pages_only=True)
                ]
            if not took:
                break
            claimed += took
    assert len(claimed) == phone_pages
    first_round = claimed[: len(incidents)]
    assert sorted(incident for _channel, incident in first_round) == sorted(incidents)
    lead = {incident: Channel(channel) for incident, channel in leading}
    assert all(channel is lead[incident] for channel, incident in first_round)


@pytest.mark.parametrize("tier", ["leading", "first", "any"])
def test_a_senders_claim_reads_its_channels_index_in_order_and_stops_at_the_first_free_row(
    county_url: str, phone_network: str, tier: str
) -> None:
    """The claim of one channel, as every sender makes it, in the plan psycopg's prepared
    statement gets (generic): an index scan in (created_at, id) order on an index that
    starts with the channel — no sort, and not the all-channel first-pages index, which a
    mass event's claims walked from its oldest row past every other channel's page and
    every waiting sibling (issue 13; ``= ANY(array)`` planned so)."""
    devices = [r[0] for r in q(county_url, "SELECT id FROM devices WHERE kind = 'wristband' ORDER BY id LIMIT 12")]
    for device in devices:
        press(county_url, device, DAY, msg_id=f"m-{device}")
    make_router(county_url, phone_network, Clock(DAY)).run_due_steps()
    extra = {"leading": attempts._UNPAGED_FIRST_PAGES, "first": attempts._FIRST_PAGES, "any": ""}[tier]
    query, params = attempts.claim_query(extra, (Channel.SMS,), DAY, 1)
    # As a prepared statement, with $n parameters: EXPLAIN with bound values plans for those values.
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", query)))
    numbered = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m.group(1)) + 1}", query)
    with psycopg.connect(county_url) as conn:
        conn.execute("ANALYZE notification_attempts")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute("SET enable_seqscan = off")  # a dozen rows: the question is which index, and in what order
        conn.execute(f"PREPARE claim_tier AS {numbered}")
        arguments = ", ".join(["%s"] * len(names))
        # The arguments as literals (a client-side cursor): EXECUTE's parameters are the statement's.
        explained = psycopg.ClientCursor(conn).execute(
            f"EXPLAIN EXECUTE claim_tier({arguments})", [params[n] for n in names]
        )
        plan = "\n".join(str(row[0]) for row in explained)
        taken = conn.execute(query, params).fetchall()
    assert "Sort" not in plan, plan
    assert "notification_attempts_first_pages_idx" not in plan, plan
    assert "Index Cond: (channel = $" in plan, plan
    assert taken
    assert all(row[5] == "sms" for row in taken)
