"""An SOS while PostgreSQL is down, end to end (issue 12): `shouhu hub` and `shouhu router`
processes, a real Mosquitto, the phone-network simulator, and a PostgreSQL crashed with
`pg_ctl stop -m immediate`.

The hub fsyncs the press to its spool and pages the first step from its roster
snapshot within 10 s; when PostgreSQL returns the spool is reconciled into exactly one
incident carrying the code the pages carried, nobody gets a second first page, and the
chain goes on (the guardians are paged when the step's wait runs out)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shouhu.embedded.postgres import LocalPostgres
from simulators.wristband import Wristband
from tests.support.hub import query, wait_until
from tests.support.services import Mosquitto, ShouhuProcess, session_data_dir, shouhu_stack

ACK_TIMEOUT_S = 6
# The demo county's recurring visits open blue incidents as the router's sweeper runs;
# what the spool reconciles is the one red incident.
RED_CODES = "SELECT code FROM incidents WHERE severity = 'red'"


@pytest.fixture
def stack(own_postgres: tuple[LocalPostgres, str], broker: Mosquitto) -> Iterator[dict[str, Any]]:
    cluster, url = own_postgres
    for running in shouhu_stack(url, broker, name="spool-e2e", SHOUHU_ACK_TIMEOUT_S=str(ACK_TIMEOUT_S)):
        yield {
            **running,
            "cluster": cluster,
            "url": url,
            "broker": broker,
            "spool": session_data_dir() / "spool" / running["hub_id"],
            "hub": running["processes"][1],
        }


def metric_text(url: str) -> str:
    try:
        return httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return ""


def metric_value(url: str, name: str) -> float:
    for line in metric_text(url).splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def calls(phone: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{phone}/_sim/calls").json())


def messages(phone: str) -> list[dict[str, Any]]:
    return list(httpx.get(f"{phone}/_sim/messages").json())


def test_an_sos_while_postgres_is_down_is_paged_from_the_spool_and_reconciled(stack: dict[str, Any]) -> None:
    phone, url = stack["phone"], stack["url"]
    wait_until((stack["spool"] / "roster.json").exists, timeout=15, what="the hub's first roster snapshot")
    stack["cluster"].stop("immediate")  # a crash of the database
    band = Wristband(stack["broker"].url, "wb-0001", resend_s=2.0)
    try:
        pressed = time.monotonic()
        msg_id = band.alarm("sos", action="press")
        first = wait_until(lambda: calls(phone), timeout=15, what="a call placed from the spool")
        assert float(first[0]["monotonic"]) - pressed < 10.0, "the first page must go out within 10 s of the press"
        receipt = band.wait_for_receipt(msg_id, timeout=10)
        assert receipt is not None
        assert receipt["state"] == "spooled"
        code = receipt["incident"]
        spool_sms = wait_until(
            lambda: [m for m in messages(phone) if code in m["body"]], what="the spool's SMS with its code"
        )
        first_step = {m["to"] for m in spool_sms}
        assert "spooled" in stack["hub"].output()

        stack["cluster"].start()
        wait_until(lambda: query(url, RED_CODES), timeout=30, what="the reconciled incident")
        assert query(url, "SELECT code, state FROM incidents WHERE severity = 'red'") == [(code, "open")]
        attempts = query(
            url, "SELECT address, channel, state FROM notification_attempts WHERE step = 0 AND round = 0"
        )
        assert first_step <= {address for address, _channel, _state in attempts}
        # The chain goes on from there: the guardians when the first step's wait runs out.
        guardians = {
            row[0]
            for row in query(
                url,
                "SELECT g.phone FROM guardians g JOIN devices d ON d.resident_id = g.resident_id WHERE d.id = %s",
                "wb-0001",
            )
        }
        wait_until(
            lambda: {c["to"] for c in calls(phone)} & guardians, timeout=ACK_TIMEOUT_S + 20, what="the guardians"
        )
        placed = calls(phone)
    finally:
        band.close()
    # Nobody paged from the spool was paged a second time by the router's first step.
    for number in first_step:
        assert sum(1 for c in placed if c["to"] == number) == 1, f"{number} got a second first page"
    assert query(url, "SELECT count(*) FROM incidents WHERE severity = 'red'") == [(1,)]
    events = {r[0] for r in query(url, "SELECT event FROM incident_events")}
    assert "spool_paged" in events or any("spool" in e for e in events), events


def test_a_hub_sigkilled_during_the_outage_pages_nobody_twice_and_reconciles_after_restart(
    stack: dict[str, Any],
) -> None:
    """The spool survives the hub: a SIGKILL after the spool's page, a new hub started
    while PostgreSQL is still down (the broker redelivers the unacknowledged press),
    then the database back: one incident, and the spool's people paged once."""
    phone, url, hub = stack["phone"], stack["url"], stack["hub"]
    wait_until((stack["spool"] / "roster.json").exists, timeout=15, what="the hub's first roster snapshot")
    stack["cluster"].stop("immediate")
    band = Wristband(stack["broker"].url, "wb-0002", resend_s=1.0)
    try:
        msg_id = band.alarm("sos", action="press")
        receipt = band.wait_for_receipt(msg_id, timeout=15)
        assert receipt is not None
        code = receipt["incident"]
        first_step = wait_until(
            lambda: {m["to"] for m in messages(phone) if code in m["body"]}, what="the spool's SMS"
        )
        paged_calls = len(calls(phone))
        hub.kill(9)
        restarted = ShouhuProcess(hub.args, hub.env, ready_url=None).start()
        try:
            metrics = f"http://127.0.0.1:{hub.env['SHOUHU_METRICS_PORT']}/metrics"
            # The broker redelivers the press the killed hub never acknowledged; the
            # restarted hub's spool already holds it and does not page it again.
            wait_until(
                lambda: metric_value(metrics, "shouhu_spool_redeliveries_total") >= 1,
                timeout=20,
                what="the redelivered press recognised by the restarted hub's spool",
            )
            stack["cluster"].start()
            wait_until(lambda: query(url, RED_CODES), timeout=30, what="the reconciled incident")
        finally:
            restarted.stop()
    finally:
        band.close()
    assert query(url, RED_CODES) == [(code,)]
    assert len(calls(phone)) >= paged_calls
    for number in first_step:
        assert sum(1 for m in messages(phone) if m["to"] == number and code in m["body"]) == 1, number
