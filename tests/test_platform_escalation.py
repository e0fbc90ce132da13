"""Step 3 of the chain: the emergency platform gets a signed CAP alert; an acknowledgement,
a resolution or a cancel later reaches it as a CAP Update or Cancel referencing it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from alerts.acknowledge import Actor, acknowledge, resolve
from alerts.router import Router
from api.main import create_app
from devices.kinds import Outcome
from shouhu.embedded.postgres import free_port
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from simulators.emergency_platform import create_emergency_platform
from tests.escalation_support import (
    DAY,
    PLATFORM_SECRET,
    Clock,
    calls,
    make_router,
    platform_webhook,
    press,
    q,
    wristband_in,
)
from tests.escalation_support import platform_alerts as alerts
from tests.services import serve_app


@pytest.fixture
def platform() -> Iterator[str]:
    yield from serve_app(create_emergency_platform(PLATFORM_SECRET, announce=lambda _line: None))


def router_with_platform(url: str, phone: str, platform_base: str, clock: Clock, *, exercise: bool = False) -> Router:
    return make_router(url, phone, clock, platform=platform_webhook(platform_base), exercise=exercise)


def escalate_to_platform(
    url: str, phone: str, platform_base: str, *, exercise: bool = False
) -> tuple[int, Clock, Router]:
    device, _grid, _resident = wristband_in(url, night_covered=False)
    clock = Clock(DAY)
    incident = press(url, device, DAY)
    router = router_with_platform(url, phone, platform_base, clock, exercise=exercise)
    for _ in range(3):  # grid worker at 0 s, guardians at 120 s, the platform at 240 s
        router.run_once()
        clock.advance(120)
    return incident, clock, router


def test_the_platform_step_sends_a_cap_alert_with_what_a_dispatcher_needs(
    county_url: str, phone_network: str, platform: str
) -> None:
    incident, _clock, _router = escalate_to_platform(county_url, phone_network, platform)
    received = alerts(platform)
    assert [(a["msgType"], a["status"]) for a in received] == [("Alert", "Actual")]
    code, notes, name = q(
        county_url,
        "SELECT i.code, r.medical_notes, r.name FROM incidents i"
        " JOIN residents r ON r.id = i.resident_id WHERE i.id = %s",
        incident,
    )[0]
    assert received[0]["incident_code"] == code
    assert received[0]["resident_name"] == name
    xml = received[0]["xml"]
    if notes:
        assert notes in xml  # the platform, unlike an SMS, gets the medical notes
    tried = q(county_url, "SELECT DISTINCT s.name FROM notification_attempts a JOIN staff s ON s.id = a.recipient_id")
    assert all(n in xml for (n,) in tried)  # who was tried
    attempt = q(county_url, "SELECT state, provider_id FROM notification_attempts WHERE purpose = 'cap_alert'")
    assert attempt == [("sent", received[0]["receipt"])]


def test_acknowledgement_then_false_alarm_reach_the_platform_as_update_and_cancel(
    county_url: str, phone_network: str, platform: str
) -> None:
    incident, clock, router = escalate_to_platform(county_url, phone_network, platform)
    operator = Actor("token", "9", "值班长", None, "operator")
    with psycopg.connect(county_url) as conn:
        acknowledge(conn, incident, operator, "api", clock(), resolve_timeout_s=1800)
    router.run_once()
    clock.advance(60)
    with psycopg.connect(county_url) as conn:
        resolve(conn, incident, Outcome.FALSE_ALARM, "误触", operator, clock())
    router.run_once()
    received = alerts(platform)
    assert [a["msgType"] for a in received] == ["Alert", "Update", "Cancel"]
    first = received[0]
    for later in received[1:]:
        assert [(r["identifier"], r["known"]) for r in later["references"]] == [(first["identifier"], True)]
        assert later["references"][0]["sent"] == first["sent"]
    assert "值班长" in received[1]["xml"]


def test_nothing_goes_to_a_platform_that_was_never_told(county_url: str, phone_network: str, platform: str) -> None:
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    clock = Clock(DAY)
    incident = press(county_url, device, DAY)
    router = router_with_platform(county_url, phone_network, platform, clock)
    router.run_once()
    with psycopg.connect(county_url) as conn:
        acknowledge(conn, incident, Actor("token", "1", "x", None, "operator"), "api", clock(), resolve_timeout_s=1800)
    router.run_once()
    assert alerts(platform) == []


def test_the_demo_sends_exercise_alerts(county_url: str, phone_network: str, platform: str) -> None:
    escalate_to_platform(county_url, phone_network, platform, exercise=True)
    assert [a["status"] for a in alerts(platform)] == ["Exercise"]


def test_a_platform_dispatcher_acknowledges_through_the_api(county_url: str, phone_network: str, platform: str) -> None:
    with psycopg.connect(county_url) as conn:
        secret = create_token(
            conn, role=Role.PLATFORM, areas=[], label="120调度台", now=datetime.now(UTC), expires_at=None
        )
    for api in serve_app(create_app(Settings(database_url=county_url))):
        httpx.post(f"{platform}/_sim/dispatcher", json={"api_url": api, "token": secret}).raise_for_status()
        incident, _clock, _router = escalate_to_platform(county_url, phone_network, platform)
        deadline = time.monotonic() + 10
        while q(county_url, "SELECT state FROM incidents WHERE id = %s", incident) != [("acknowledged",)]:
            assert time.monotonic() < deadline, "the platform's dispatcher never acknowledged"
            time.sleep(0.05)
    assert q(county_url, "SELECT acknowledged_by_name, acknowledged_via FROM incidents") == [("120调度台", "api")]


def step_started(url: str, incident: int) -> list[tuple[int, int, str, set[str]]]:
    """(round, step, target, recipient ids) of each step that paged someone, in order."""
    rows = q(
        url,
        "SELECT detail FROM incident_events WHERE incident_id = %s AND event = 'step_started' ORDER BY id",
        incident,
    )
    return [(d["round"], d["step"], d["target"], {r["id"] for r in d["recipients"]}) for (d,) in rows]


def test_nobody_answers_the_whole_chain_runs_to_unreached_and_starts_over(
    county_url: str, phone_network: str, platform: str
) -> None:
    device, _grid, resident = wristband_in(county_url, night_covered=False)
    clock = Clock(DAY)
    incident = press(county_url, device, DAY)
    waits = [s["wait_s"] for s in q(county_url, "SELECT policy_snapshot FROM incidents")[0][0]["steps"]]
    assert waits == [120, 120, 120, 120]  # the default timeline: 0 / 120 / 240 / 360, unreached at 480
    router = router_with_platform(county_url, phone_network, platform, clock)
    guardians = {r[0] for r in q(county_url, "SELECT phone FROM guardians WHERE resident_id = %s", resident)}

    def new_calls(since: int) -> set[str]:
        return {c["to"] for c in calls(phone_network)[since:]}

    router.run_once()  # 0 s: the grid worker
    [(_r, _s, target, worker_ids)] = step_started(county_url, incident)
    assert target == "grid_worker"
    workers = {r[0] for r in q(county_url, "SELECT phone FROM staff WHERE id = ANY(%s)", list(worker_ids))}
    assert new_calls(0) == workers
    seen = len(calls(phone_network))

    clock.advance(119)
    router.run_once()
    assert new_calls(seen) == set()  # nobody before the step's wait is up
    clock.advance(1)
    router.run_once()  # 120 s: the guardians
    assert new_calls(seen) == guardians
    seen = len(calls(phone_network))

    clock.advance(120)
    router.run_once()  # 240 s: the emergency platform, and no phone call
    assert [a["msgType"] for a in alerts(platform)] == ["Alert"]
    assert new_calls(seen) == set()
    assert q(county_url, "SELECT state FROM notification_attempts WHERE purpose = 'cap_alert'") == [("sent",)]

    clock.advance(120)
    router.run_once()  # 360 s: the county operators
    operator_ids = step_started(county_url, incident)[-1][3]
    operators = {r[0] for r in q(county_url, "SELECT phone FROM staff WHERE id = ANY(%s)", list(operator_ids))}
    assert step_started(county_url, incident)[-1][2] == "operators"
    assert new_calls(seen) == operators
    assert q(county_url, "SELECT state FROM incidents") == [("open",)]
    seen = len(calls(phone_network))

    clock.advance(120)
    router.run_once()  # 480 s: unreached, the operators alarmed, and round 1 pages the grid worker again
    assert q(county_url, "SELECT state FROM incidents") == [("unreached",)]
    assert new_calls(seen) == operators | workers
    alarmed = q(
        county_url,
        "SELECT DISTINCT address FROM notification_attempts WHERE round = 0 AND step = 4 AND channel = 'voice'",
    )
    assert {a[0] for a in alarmed} == operators
    assert [(r, s, t) for r, s, t, _ids in step_started(county_url, incident)] == [
        (0, 0, "grid_worker"),
        (0, 1, "guardians"),
        (0, 2, "emergency_platform"),
        (0, 3, "operators"),
        (1, 0, "grid_worker"),
    ]
    events = [
        (e, at - DAY)
        for e, at in q(
            county_url,
            "SELECT event, at FROM incident_events WHERE incident_id = %s AND event IN ('step_started', 'unreached')"
            " ORDER BY id",
            incident,
        )
    ]
    assert [(e, int(d.total_seconds())) for e, d in events] == [
        ("step_started", 0),
        ("step_started", 120),
        ("step_started", 240),
        ("step_started", 360),
        ("unreached", 480),
        ("step_started", 480),
    ]
    assert [a["msgType"] for a in alerts(platform)] == ["Alert"]  # round 1 has not reached the platform yet
    assert q(county_url, "SELECT step, round, due_at - %s FROM escalation_actions WHERE state = 'pending'", DAY) == [
        (1, 1, timedelta(seconds=600))
    ]


@pytest.mark.parametrize("down", ["503", "unreachable"])
def test_a_platform_that_never_takes_the_alert_pages_the_operators_at_once(
    county_url: str, phone_network: str, platform: str, down: str
) -> None:
    if down == "503":
        httpx.post(f"{platform}/_sim/faults", json={"fail": "error", "times": 100}).raise_for_status()
        url = platform
    else:
        url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    clock = Clock(DAY)
    incident = press(county_url, device, DAY)
    router = make_router(county_url, phone_network, clock, platform=platform_webhook(url))
    for _ in range(2):  # grid worker at 0 s, guardians at 120 s
        router.run_once()
        clock.advance(120)
    calls_before = len(calls(phone_network))

    # 240 s: the CAP alert's tries fail, one request per attempt row, 0.5, 1, 2 and 4 s
    # apart (issue 13: a retry is a scheduled row, never a sleep in a sender).
    router.run_once()
    for backoff in (0.5, 1, 2, 4):
        clock.advance(backoff)
        router.run_once()

    tries = q(county_url, "SELECT state, error FROM notification_attempts WHERE purpose = 'cap_alert' ORDER BY id")
    assert [state for state, _error in tries] == ["failed"] * 5
    error = tries[-1][1]
    assert "HTTP 503" in error or "cannot reach" in error
    assert (
        len({body for (body,) in q(county_url, "SELECT body FROM notification_attempts WHERE purpose = 'cap_alert'")})
        == 1
    )  # one CAP message
    if down == "503":
        assert len(httpx.get(f"{platform}/_sim/deliveries").json()) == 5
    [(_r, step, target, operator_ids)] = step_started(county_url, incident)[3:]
    assert (step, target) == (3, "operators")
    operators = {r[0] for r in q(county_url, "SELECT phone FROM staff WHERE id = ANY(%s)", list(operator_ids))}
    assert operators
    assert {c["to"] for c in calls(phone_network)[calls_before:]} == operators
    advanced = q(county_url, "SELECT at, detail FROM incident_events WHERE event = 'step_advanced'")
    assert advanced == [
        (DAY + timedelta(seconds=247.5), {"reason": "every channel of the step failed", "step": 2, "round": 0})
    ]
    assert q(county_url, "SELECT step, due_at FROM escalation_actions WHERE state = 'pending'") == [
        (4, DAY + timedelta(seconds=367.5))
    ]
