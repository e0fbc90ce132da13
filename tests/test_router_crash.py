"""The router killed mid-send, and steps firing on time with a real clock."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest

from alerts.router import DEFAULT_SENDERS, Router
from shouhu.embedded.postgres import free_port
from tests.support.escalation import (
    FROM,
    PHONE_SID,
    PHONE_TOKEN,
    HangingProvider,
    calls,
    make_router,
    messages,
    press,
    q,
    wristband_in,
)
from tests.support.services import ShouhuProcess, shouhu_env


def router_hung_in_a_call(county_url: str, hanging: HangingProvider) -> ShouhuProcess:
    """A `shouhu router` process paging through ``hanging``, once its first provider call is stuck."""
    port = free_port()
    router = ShouhuProcess(
        ["router"],
        shouhu_env(
            SHOUHU_DATABASE_URL=county_url,
            SHOUHU_TWILIO_ACCOUNT_SID=PHONE_SID,
            SHOUHU_TWILIO_AUTH_TOKEN=PHONE_TOKEN,
            SHOUHU_TWILIO_FROM=FROM,
            SHOUHU_TWILIO_API_BASE=hanging.url,
            SHOUHU_METRICS_PORT=str(port),
        ),
        ready_url=f"http://127.0.0.1:{port}/readyz",
    ).start()
    deadline = time.monotonic() + 15
    while not hanging.requests:
        assert time.monotonic() < deadline, "the router never called the provider"
        time.sleep(0.02)
    return router


@pytest.fixture
def hanging() -> Iterator[HangingProvider]:
    provider = HangingProvider()
    yield provider
    provider.close()


def test_a_router_killed_mid_call_resends_only_that_attempt_and_skips_no_step(
    county_url: str, phone_network: str, hanging: HangingProvider
) -> None:
    device, _grid, _resident = wristband_in(county_url, night_covered=True)
    incident = press(county_url, device, datetime.now(UTC))
    doomed = router_hung_in_a_call(county_url, hanging)
    doomed.kill(9)  # SIGKILL while the provider calls are open
    in_flight = list(hanging.requests)
    before = q(county_url, "SELECT id, channel, attempt, state, address FROM notification_attempts ORDER BY id")
    hung = {(request["To"], "voice" if "Calls" in request["path"] else "sms") for request in in_flight}
    stuck = [row for row in before if (row[4], row[1]) in hung]
    assert len(stuck) == len(in_flight)
    assert all(row[3] == "pending" for row in stuck), "an attempt in flight was completed by the dead router"
    # Another router takes over with a working provider.
    survivor: Router = make_router(county_url, phone_network, lambda: datetime.now(UTC))  # type: ignore[arg-type]
    survivor.run_once()
    after = q(county_url, "SELECT id, channel, attempt, state, address FROM notification_attempts ORDER BY id")
    assert [row[0] for row in after] == [row[0] for row in before]  # the same keys, no new attempts
    assert all(row[2] == 1 and row[3] == "sent" for row in after)
    sent_to = [c["to"] for c in calls(phone_network)] + [m["to"] for m in messages(phone_network)]
    # Every phone attempt went out once through the survivor: those that were in flight
    # reached a provider twice (once into the hang, once here), each under its own key;
    # no other attempt did, and no attempt was sent a third time.
    phone_attempts = [row for row in after if row[1] in ("voice", "sms")]
    assert sorted(sent_to) == sorted(row[4] for row in phone_attempts)
    assert 1 <= len(in_flight) <= DEFAULT_SENDERS
    assert len(hanging.requests) == len(in_flight)  # the dead router sent nothing more
    assert all(request["To"] in sent_to for request in in_flight)
    steps = q(county_url, "SELECT step, state FROM escalation_actions WHERE incident_id = %s ORDER BY id", incident)
    assert steps == [(0, "done"), (1, "pending")]


def test_steps_fire_within_a_second_of_their_due_time(county_url: str, phone_network: str) -> None:
    with psycopg.connect(county_url) as conn:
        conn.execute(
            "UPDATE escalation_policies SET steps = %s WHERE id = 'default-sos'",
            (
                json.dumps(
                    [
                        {"target": "grid_worker", "channels": ["sms"], "wait_s": 1},
                        {"target": "guardians", "channels": ["sms"], "wait_s": 1},
                        {"target": "operators", "channels": ["sms"], "wait_s": 1},
                    ]
                ),
            ),
        )
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    router = make_router(county_url, phone_network, lambda: datetime.now(UTC))  # type: ignore[arg-type]
    thread = threading.Thread(target=router.run, daemon=True)
    thread.start()
    try:
        incident = press(county_url, device, datetime.now(UTC))
        deadline = time.monotonic() + 10
        while len(q(county_url, "SELECT 1 FROM incident_events WHERE event = 'step_started'")) < 3:
            assert time.monotonic() < deadline, "steps did not fire"
            time.sleep(0.05)
    finally:
        router.stop()
        thread.join(10)
    due = dict(q(county_url, "SELECT step, due_at FROM escalation_actions WHERE incident_id = %s", incident))
    fired = [
        (r[0]["step"], r[1])
        for r in q(county_url, "SELECT detail, at FROM incident_events WHERE event = 'step_started' ORDER BY id")
    ]
    for step, at in fired:
        lateness = (at - due[step]).total_seconds()
        assert 0 <= lateness < 1.0, f"step {step} fired {lateness:.3f}s after its due time"


def test_a_router_killed_in_a_later_step_loses_no_step_and_the_chain_goes_on(
    county_url: str, phone_network: str, hanging: HangingProvider
) -> None:
    """Killed while paging the guardians (step 1): the survivor re-sends those attempts
    under their keys, and steps 2 and 3 still run, once each."""
    device, _grid, _resident = wristband_in(county_url, night_covered=True)
    incident = press(county_url, device, datetime.now(UTC))
    first = make_router(county_url, phone_network, lambda: datetime.now(UTC))  # type: ignore[arg-type]
    first.run_once()  # step 0, through the working provider
    with psycopg.connect(county_url) as conn:
        conn.execute("UPDATE escalation_actions SET due_at = now() WHERE incident_id = %s AND step = 1", (incident,))
    doomed = router_hung_in_a_call(county_url, hanging)
    doomed.kill(9)
    in_flight = list(hanging.requests)
    keys_before = q(county_url, "SELECT id FROM notification_attempts WHERE step = 1 ORDER BY id")
    survivor = make_router(county_url, phone_network, lambda: datetime.now(UTC))  # type: ignore[arg-type]
    survivor.run_once()
    assert q(county_url, "SELECT id FROM notification_attempts WHERE step = 1 ORDER BY id") == keys_before
    assert q(county_url, "SELECT count(*) FROM notification_attempts WHERE step = 1 AND state <> 'sent'") == [(0,)]
    assert all(
        request["To"] in [c["to"] for c in calls(phone_network)] + [m["to"] for m in messages(phone_network)]
        for request in in_flight
    )
    for step in (2, 3):
        with psycopg.connect(county_url) as conn:
            conn.execute(
                "UPDATE escalation_actions SET due_at = now()"
                " WHERE incident_id = %s AND step = %s AND state = 'pending'",
                (incident, step),
            )
        survivor.run_once()
    steps = q(
        county_url,
        "SELECT step, count(*) FROM escalation_actions WHERE incident_id = %s AND state = 'done'"
        " GROUP BY step ORDER BY step",
        incident,
    )
    assert steps[:4] == [(0, 1), (1, 1), (2, 1), (3, 1)]
