"""Escalation policies: area overrides, repeats, and the snapshot frozen at opening."""

from __future__ import annotations

import json
from datetime import timedelta

import psycopg

from alerts.policy import Step, expand_repeats, policy_rows, resolve_policy
from devices.kinds import Channel, EscalationTarget, IncidentKind
from tests.support.escalation import DAY, Clock, calls, make_router, press, q, wristband_in


def _snapshot_targets(url: str, incident: int) -> list[tuple[str, int]]:
    snapshot = q(url, "SELECT policy_snapshot FROM incidents WHERE id = %s", incident)[0][0]
    return [(s["target"], s["wait_s"]) for s in snapshot["steps"]]


def test_the_nearest_area_policy_wins_and_fall_uses_sos_when_it_has_none(county_url: str) -> None:
    nanshan_grid = q(
        county_url, "SELECT id FROM areas WHERE level = 'grid' AND id LIKE 'nanshan-%%' ORDER BY id LIMIT 1"
    )
    dongguan_grid = q(
        county_url, "SELECT id FROM areas WHERE level = 'grid' AND id LIKE 'dongguan-%%' ORDER BY id LIMIT 1"
    )
    with psycopg.connect(county_url) as conn:
        override = resolve_policy(conn, IncidentKind.SOS, nanshan_grid[0][0], 120)
        default = resolve_policy(conn, IncidentKind.SOS, dongguan_grid[0][0], 120)
        conn.execute("DELETE FROM escalation_policies WHERE kind = 'fall'")
        fall = resolve_policy(conn, IncidentKind.FALL, dongguan_grid[0][0], 120)
    assert override.policy_id == "nanshan-sos"
    assert override.steps[0].wait_s == 90
    assert default.policy_id == "default-sos"
    assert default.steps[0].wait_s == 120  # no wait in the file: SHOUHU_ACK_TIMEOUT_S
    assert fall.policy_id == "default-sos"


def test_many_areas_resolve_in_one_statement_as_each_does_alone(county_url: str) -> None:
    """A mass event's group resolves every grid's policy at once (``policy_rows``): each
    area gets exactly what ``resolve_policy`` gives it alone, the county's own (None) too."""
    grids = [g for (g,) in q(county_url, "SELECT id FROM areas WHERE level = 'grid' ORDER BY id")]
    with psycopg.connect(county_url) as conn:
        for kind in (IncidentKind.SOS, IncidentKind.FALL):
            together = policy_rows(conn, kind, [*grids, None])
            alone = {area: resolve_policy(conn, kind, area, 120) for area in [*grids, None]}
            assert {area: row[0] if row else "built-in" for area, row in together.items()} == {
                area: snapshot.policy_id for area, snapshot in alone.items()
            }
            conn.execute("UPDATE escalation_policies SET active = false WHERE area_id IS NULL AND kind = 'fall'")
    assert len({alone[g].policy_id for g in grids}) > 1, "the demo county overrides some grids"


def test_built_in_default_without_any_policy(county_url: str) -> None:
    with psycopg.connect(county_url) as conn:
        conn.execute("UPDATE escalation_policies SET active = false")
        policy = resolve_policy(conn, IncidentKind.SOS, None, 45)
    assert policy.policy_id == "built-in"
    assert [s.target for s in policy.steps] == [
        EscalationTarget.GRID_WORKER,
        EscalationTarget.GUARDIANS,
        EscalationTarget.EMERGENCY_PLATFORM,
        EscalationTarget.OPERATORS,
    ]
    assert {s.wait_s for s in policy.steps} == {45}


def test_repeats_become_consecutive_steps() -> None:
    steps = expand_repeats(
        [
            Step(EscalationTarget.GRID_WORKER, (Channel.VOICE,), 60, 2),
            Step(EscalationTarget.GUARDIANS, (Channel.SMS,), 30, 0),
        ]
    )
    assert [(s.target, s.wait_s, s.repeats) for s in steps] == [
        (EscalationTarget.GRID_WORKER, 60, 0),
        (EscalationTarget.GRID_WORKER, 60, 0),
        (EscalationTarget.GRID_WORKER, 60, 0),
        (EscalationTarget.GUARDIANS, 30, 0),
    ]


def test_an_edit_after_opening_never_changes_a_running_escalation(county_url: str, phone_network: str) -> None:
    device, _grid, resident = wristband_in(county_url, night_covered=False)
    clock = Clock(DAY)
    incident = press(county_url, device, DAY)
    frozen = _snapshot_targets(county_url, incident)
    with psycopg.connect(county_url) as conn:
        # The county edits the default: guardians first, with a 10-minute wait.
        conn.execute(
            "UPDATE escalation_policies SET steps = %s WHERE id = 'default-sos'",
            (json.dumps([{"target": "guardians", "channels": ["voice"], "wait_s": 600, "repeats": 0}]),),
        )
    router = make_router(county_url, phone_network, clock)
    router.run_once()
    clock.advance(120)
    router.run_once()
    assert _snapshot_targets(county_url, incident) == frozen
    guardians = {r[0] for r in q(county_url, "SELECT phone FROM guardians WHERE resident_id = %s", resident)}
    # Step 1 of the frozen policy (guardians) ran at 120 s, as the snapshot says.
    assert guardians <= {c["to"] for c in calls(phone_network)}
    due = q(county_url, "SELECT step, due_at FROM escalation_actions WHERE state = 'pending'")
    assert due == [(2, DAY + timedelta(seconds=240))]
