"""The hub's alarm spool (hub/spool.py) against the real PostgreSQL and the phone-network
simulator: the roster snapshot, the fsynced journal, paging while the database is down,
the hard timeout, and reconciling into exactly one incident with no second first page.

Time is the test's: the clock is passed in. The only real waits are the hard timeout
of a hanging provider (a second) and a PostgreSQL cluster stopped and started again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from alerts.notifiers.base import SendOutcome
from alerts.notifiers.twilio import TwilioNotifier
from alerts.recipients import Rosters
from devices.kinds import IncidentKind
from hub.ingest import IngestConfig
from hub.mqtt import Received
from hub.spool import JOURNAL_FILE, SNAPSHOT_FILE, TIMELINE_EVENT, Spool, SpoolBusy, SpoolPage
from shouhu.embedded.postgres import LocalPostgres
from shouhu.settings import Settings
from tests.support.aliyun import ALIYUN_SETTINGS, WORKER, WRISTBAND
from tests.support.escalation import (
    DAY,
    FROM,
    NIGHT,
    PHONE_SID,
    PHONE_TOKEN,
    ZONE,
    Clock,
    HangingProvider,
    calls,
    make_router,
    messages,
    q,
    wristband_in,
)

HUB = "hub-spool-test"
CONFIG = IngestConfig(hub_id=HUB, ack_timeout_s=120)
# Callbacks go nowhere: port 9 (discard) refuses, and no API of another test answers.
NO_API = "http://127.0.0.1:9"


def notifier(api_base: str, *, timeout: float = 10.0) -> TwilioNotifier:
    return TwilioNotifier(PHONE_SID, PHONE_TOKEN, FROM, api_base, NO_API, timeout=timeout)


def open_spool(directory: Path, api_base: str, clock: Clock, *, timeout: float = 5.0) -> Spool:
    return Spool(directory, notifier(api_base), hub_id=HUB, zone=ZONE, clock=clock, request_timeout_s=timeout)


def press(device: str, at: datetime, msg_id: str = "m1", action: str = "press", channel: str = "sos") -> Received:
    payload = json.dumps({"msg_id": msg_id, "ts": at.isoformat(), "action": action}).encode()
    return Received(f"shouhu/v1/wristband/{device}/{channel}", payload, 1, False, 7, 1, at, time.monotonic())


def redelivered(received: Received, at: datetime) -> Received:
    """The same message again, later: the same bytes (the wristband's re-send, or the broker's)."""
    return dataclasses.replace(received, received_at=at, mid=received.mid + 1)


def refreshed(spool: Spool, url: str, at: datetime) -> None:
    with psycopg.connect(url) as conn:
        spool.refresh(conn, at)


def reconcile(spool: Spool, url: str) -> list[tuple[int | None, str, int]]:
    with psycopg.connect(url, autocommit=False) as conn:
        done = spool.reconcile(conn, CONFIG)
    return [(r.incident_id, r.result, r.attempts_recorded) for r in done]


def first_page_attempts_of(pages: tuple[SpoolPage, ...]) -> list[tuple[str, str, str, str, str | None]]:
    return sorted((p.recipient.id, p.recipient.phone, p.channel.value, p.outcome.value, p.provider_id) for p in pages)


def first_page_attempts(url: str) -> list[tuple[str, str, str, str, str | None]]:
    return [
        (r[0], r[1], r[2], r[3], r[4])
        for r in q(
            url,
            "SELECT recipient_id, address, channel, state, provider_id FROM notification_attempts"
            " WHERE purpose = 'page' AND step = 0 AND round = 0 AND attempt = 1 ORDER BY recipient_id, channel",
        )
    ]


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    # Always the test's own directory: a leftover /var/lib/shouhu must never be used.
    return tmp_path / "spool"


@dataclasses.dataclass(frozen=True)
class Pressing:
    spool: Spool
    clock: Clock
    device: str
    resident: str


@pytest.fixture
def at_day(county_url: str, phone_network: str, spool_dir: Path) -> Iterator[Pressing]:
    """A spool whose snapshot was read a minute before DAY, and a wristband of a grid worked by day only."""
    device, _grid, resident = wristband_in(county_url, night_covered=False)
    clock = Clock(DAY)
    spool = open_spool(spool_dir, phone_network, clock)
    refreshed(spool, county_url, DAY - timedelta(minutes=1))
    yield Pressing(spool, clock, device, resident)
    spool.close()


# -- the roster snapshot ---------------------------------------------------------------


def test_the_snapshot_is_persisted_atomically_and_a_new_spool_loads_it(
    county_url: str, phone_network: str, spool_dir: Path
) -> None:
    clock = Clock(DAY)
    spool = open_spool(spool_dir, phone_network, clock)
    assert spool.snapshot is None
    refreshed(spool, county_url, DAY - timedelta(hours=1))
    snapshot_file = spool_dir / SNAPSHOT_FILE
    assert stat.S_IMODE(snapshot_file.stat().st_mode) == 0o600  # names and phones (PIPL)
    assert [p.name for p in spool_dir.iterdir() if p.name.endswith(".tmp")] == []
    spool.close()

    again = open_spool(spool_dir, phone_network, clock)
    assert again.snapshot is not None
    assert spool.snapshot is not None
    assert again.snapshot.to_json() == spool.snapshot.to_json()
    assert again.snapshot.taken_at == DAY - timedelta(hours=1)
    with pytest.raises(SpoolBusy):
        open_spool(spool_dir, phone_network, clock)  # one process per spool directory
    again.close()


def test_the_snapshot_pages_whom_the_router_would_at_the_moment_of_the_press(
    county_url: str, phone_network: str, spool_dir: Path
) -> None:
    """Read an hour before, evaluated at each press: every grid, day and night, as the router resolves it."""
    spool = open_spool(spool_dir, phone_network, Clock(DAY))
    refreshed(spool, county_url, DAY - timedelta(hours=1))
    snapshot = spool.snapshot
    assert snapshot is not None
    devices = q(
        county_url,
        "SELECT DISTINCT ON (r.grid_id) d.id, r.grid_id FROM devices d JOIN residents r"
        " ON r.id = d.resident_id WHERE d.kind = 'wristband' ORDER BY r.grid_id, d.id",
    )
    assert len(devices) > 10
    with psycopg.connect(county_url) as conn:
        for at in (DAY, NIGHT, DAY + timedelta(hours=9, minutes=30), NIGHT + timedelta(days=4, hours=5)):
            live = Rosters(conn, at, ZONE)
            for device, grid in devices:
                plan = snapshot.plan(device, IncidentKind.SOS, at, ZONE)
                expected = live.duty_chain(grid) or live.operators()
                assert [r.id for r in plan.recipients] == [r.id for r in expected], (device, at)
    spool.close()


def test_day_and_night_shifts_and_the_walk_up_the_tree(county_url: str, phone_network: str, spool_dir: Path) -> None:
    spool = open_spool(spool_dir, phone_network, Clock(DAY))
    refreshed(spool, county_url, DAY)
    snapshot = spool.snapshot
    assert snapshot is not None
    day_only, grid, _resident = wristband_in(county_url, night_covered=False)
    day_plan = snapshot.plan(day_only, IncidentKind.SOS, DAY, ZONE)
    assert {r.role for r in day_plan.recipients} == {"grid_worker"}
    assert all(r.area_id == grid for r in day_plan.recipients)
    # Nobody of that grid works at night: the page walks up to a duty officer above.
    night_plan = snapshot.plan(day_only, IncidentKind.SOS, NIGHT, ZONE)
    assert night_plan.recipients
    assert {r.role for r in night_plan.recipients} == {"duty_officer"}
    assert all(r.area_id != grid for r in night_plan.recipients)
    # A grid with a night shift keeps its own grid worker at night.
    night_covered, night_grid, _ = wristband_in(county_url, night_covered=True)
    covered = snapshot.plan(night_covered, IncidentKind.SOS, NIGHT, ZONE)
    assert {(r.role, r.area_id) for r in covered.recipients} == {("grid_worker", night_grid)}
    # An unregistered wristband: the county operators on duty.
    unknown = snapshot.plan("w-nobody-knows", IncidentKind.SOS, DAY, ZONE)
    assert unknown.kind is IncidentKind.SOS_UNREGISTERED
    assert {r.id for r in unknown.recipients} == {"op-01", "op-02"}
    spool.close()


# -- the journal -----------------------------------------------------------------------


def test_a_recorded_alarm_survives_a_new_spool_and_a_redelivery_is_not_a_new_alarm(
    county_url: str, phone_network: str, spool_dir: Path
) -> None:
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    clock = Clock(DAY)
    spool = open_spool(spool_dir, phone_network, clock)
    first = press(device, DAY)
    spooled = spool.record(first)
    assert spooled.new
    entry = spooled.entry
    assert (entry.device_id, entry.channel, entry.ledger_key, entry.msg_id) == (device, "sos", "m1", "m1")
    assert len(entry.code) == 5
    assert stat.S_IMODE((spool_dir / JOURNAL_FILE).stat().st_mode) == 0o600
    spool.close()  # as after a crash: only what was fsynced is read back

    restarted = open_spool(spool_dir, phone_network, clock)
    assert restarted.pending() == [entry]
    again = restarted.record(redelivered(first, DAY + timedelta(seconds=5)))  # the broker redelivers it
    assert (again.new, again.entry) == (False, entry)
    # The same msg_id with other bytes is a reused id: a new alarm, as the ledger says.
    reused = restarted.record(press(device, DAY + timedelta(seconds=9), action="press", channel="fall"))
    assert reused.new
    assert reused.entry.channel == "fall"
    unreadable = restarted.record(Received(f"shouhu/v1/wristband/{device}/sos", b"[" * 5000, 1, False, 8, 1, DAY, 0.0))
    assert unreadable.new
    assert unreadable.entry.msg_id is None
    assert unreadable.entry.ledger_key.startswith("raw:")
    assert len(restarted.pending()) == 3
    with pytest.raises(ValueError, match="not a wristband alarm topic"):
        restarted.record(Received(f"shouhu/v1/wristband/{device}/telemetry", b"{}", 1, False, 9, 1, DAY, 0.0))
    restarted.close()


def test_a_torn_last_record_is_dropped_and_the_journal_stays_appendable(
    county_url: str, phone_network: str, spool_dir: Path
) -> None:
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    spool = open_spool(spool_dir, phone_network, Clock(DAY))
    entry = spool.record(press(device, DAY)).entry
    spool.close()
    with (spool_dir / JOURNAL_FILE).open("ab") as journal:
        journal.write(b'{"t": "alarm", "id": "torn')  # a crash mid-append
    restarted = open_spool(spool_dir, phone_network, Clock(DAY))
    assert restarted.pending() == [entry]
    second = restarted.record(press(device, DAY, msg_id="m2")).entry
    restarted.close()
    assert [e.id for e in open_spool(spool_dir, phone_network, Clock(DAY)).pending()] == [entry.id, second.id]


# -- paging ----------------------------------------------------------------------------


def test_pages_reach_the_phone_network_with_the_code_and_a_redelivery_is_not_paged_twice(
    phone_network: str, spool_dir: Path, at_day: Pressing
) -> None:
    spool, clock, device = at_day.spool, at_day.clock, at_day.device
    started = time.monotonic()
    received = press(device, DAY)
    entry = spool.record(received).entry
    pages = spool.page(entry)
    assert time.monotonic() - started < 10  # paging starts (and here ends) within 10 s of the press
    plan = spool.plan(entry)
    assert plan is not None
    worker = plan.recipients[0]
    assert {(p.recipient.id, p.channel.value, p.outcome) for p in pages} == {
        (worker.id, "voice", SendOutcome.SENT),
        (worker.id, "sms", SendOutcome.SENT),
    }
    [call] = calls(phone_network)
    [sms] = messages(phone_network)
    assert (call["to"], sms["to"]) == (worker.phone, worker.phone)
    assert entry.code in sms["body"]
    assert " ".join(entry.code) in call["twiml"]  # spelled out on the call
    assert "<Gather" not in call["twiml"]  # no keypress: nothing could record it
    assert {p.provider_id for p in pages} == {call["sid"], sms["sid"]}

    assert spool.record(redelivered(received, DAY + timedelta(seconds=3))).new is False
    assert spool.page(entry) == pages  # asked again: who was paged is not paged again
    spool.close()
    restarted = open_spool(spool_dir, phone_network, clock)
    for thread in restarted.page_unpaged():  # a hub started with a spool pages what was not paged
        thread.join(10)
    assert restarted.pages(entry) == pages
    assert len(calls(phone_network)) == 1
    assert len(messages(phone_network)) == 1
    restarted.close()


@pytest.fixture
def operator_phones(county_url: str) -> dict[str, str]:
    return {r[0]: r[1] for r in q(county_url, "SELECT id, phone FROM staff WHERE role = 'operator'")}


def test_a_hanging_provider_is_cut_by_the_timeout_and_the_other_recipient_is_still_paged(
    county_url: str, phone_network: str, spool_dir: Path, operator_phones: dict[str, str]
) -> None:
    hung = operator_phones["op-01"]
    proxy = HangingProvider(phone_network, hang_for=hung)
    try:
        # The client's own timeout is long: the spool's hard limit is what cuts it.
        spool = Spool(
            spool_dir, notifier(proxy.url, timeout=60), hub_id=HUB, zone=ZONE, clock=Clock(DAY), request_timeout_s=1
        )
        refreshed(spool, county_url, DAY)
        entry = spool.record(press("w-unregistered-1", DAY)).entry  # an unregistered wristband: the operators
        started = time.monotonic()
        pages = spool.page(entry)
        assert time.monotonic() - started < 3
    finally:
        proxy.close()
    outcome = {(p.recipient.id, p.channel.value): p for p in pages}
    assert set(outcome) == {("op-01", "voice"), ("op-01", "sms"), ("op-02", "voice"), ("op-02", "sms")}
    for channel in ("voice", "sms"):
        assert outcome["op-01", channel].outcome is SendOutcome.FAILED
        assert "within 1 s" in (outcome["op-01", channel].error or "")
        assert outcome["op-02", channel].outcome is SendOutcome.SENT
    assert [c["to"] for c in calls(phone_network)] == [operator_phones["op-02"]]
    assert [m["to"] for m in messages(phone_network)] == [operator_phones["op-02"]]
    assert "未登记手环" in messages(phone_network)[0]["body"]

    # Reconciled: an sos_unregistered incident with the pages as its first step; the
    # two cut ones get the normal retry after its backoff, and nobody is paged twice.
    assert [r[1:] for r in reconcile(spool, county_url)] == [("opened", 4)]
    assert q(county_url, "SELECT kind, code FROM incidents") == [("sos_unregistered", entry.code)]
    retries = q(
        county_url,
        "SELECT recipient_id, channel, attempt, state FROM notification_attempts WHERE attempt = 2 ORDER BY channel",
    )
    assert retries == [("op-01", "sms", 2, "pending"), ("op-01", "voice", 2, "pending")]
    clock = Clock(DAY)
    router = make_router(county_url, phone_network, clock)
    router.run_once()
    assert len(calls(phone_network)) == 1
    clock.advance(20)
    router.run_once()
    assert sorted(c["to"] for c in calls(phone_network)) == sorted([operator_phones["op-02"], hung])
    assert sorted(m["to"] for m in messages(phone_network)) == sorted([operator_phones["op-02"], hung])
    spool.close()


# -- reconciling -----------------------------------------------------------------------


def test_reconcile_makes_one_incident_whose_first_step_is_the_spools_and_the_chain_goes_on(
    county_url: str, phone_network: str, at_day: Pressing
) -> None:
    spool, clock, device = at_day.spool, at_day.clock, at_day.device
    resident = at_day.resident
    received = press(device, DAY)
    entry = spool.record(received).entry
    pages = spool.page(entry)
    worker = pages[0].recipient
    spool.record(redelivered(received, DAY + timedelta(seconds=2)))  # the wristband re-sends it: no new page

    clock.advance(45)  # the database is back 45 s after the press
    [(incident, result, recorded)] = reconcile(spool, county_url)
    assert (result, recorded) == ("opened", 2)
    assert spool.pending() == []
    assert q(county_url, "SELECT id, code, state, resident_id FROM incidents") == [
        (incident, entry.code, "open", resident)
    ]
    assert first_page_attempts(county_url) == first_page_attempts_of(pages)
    [(detail,)] = q(county_url, "SELECT detail FROM incident_events WHERE event = %s", TIMELINE_EVENT)
    assert (detail["code"], detail["hub_id"], len(detail["pages"])) == (entry.code, HUB, 2)

    router = make_router(county_url, phone_network, clock)
    router.run_once()
    # No second first page: the grid worker was called and texted once, by the spool.
    assert len(calls(phone_network)) == 1
    assert len(messages(phone_network)) == 1
    after = first_page_attempts(county_url)
    assert [(a[0], a[2], a[3]) for a in after] == [
        (worker.id, "console", "sent"),  # the console is the router's: the hub's spool has none
        (worker.id, "sms", "sent"),
        (worker.id, "voice", "sent"),
    ]
    assert [a[4] for a in after[1:]] == [a[4] for a in first_page_attempts_of(pages)]
    # The next step is due a step's wait after the spool's page, not after the reconcile.
    assert q(county_url, "SELECT step, state, due_at FROM escalation_actions ORDER BY id") == [
        (0, "done", DAY),
        (1, "pending", DAY + timedelta(seconds=120)),
    ]
    clock.now = DAY + timedelta(seconds=119)
    router.run_once()
    assert len(calls(phone_network)) == 1
    clock.now = DAY + timedelta(seconds=120)
    router.run_once()
    guardians = {r[0] for r in q(county_url, "SELECT phone FROM guardians WHERE resident_id = %s AND active", resident)}
    assert guardians
    assert {c["to"] for c in calls(phone_network)[1:]} == guardians
    assert [c["to"] for c in calls(phone_network)].count(worker.phone) == 1


def test_reconcile_run_again_after_a_crash_before_marking_doubles_nothing(
    county_url: str, phone_network: str, spool_dir: Path, at_day: Pressing
) -> None:
    spool, clock, device = at_day.spool, at_day.clock, at_day.device
    entry = spool.record(press(device, DAY)).entry
    plan = spool.plan(entry)
    assert plan is not None
    plan_worker = plan.recipients[0]
    # The call fails (a provider error): its attempt is recorded failed and retried once.
    httpx.post(
        f"{phone_network}/_sim/faults", json={"to": plan_worker.phone, "fail": "error", "only": "call", "times": 1}
    ).raise_for_status()
    pages = spool.page(entry)
    assert {(p.channel.value, p.outcome) for p in pages} == {("voice", SendOutcome.FAILED), ("sms", SendOutcome.SENT)}
    spool.close()
    before_marking = spool_dir.parent / "journal-before-reconcile"
    shutil.copy(spool_dir / JOURNAL_FILE, before_marking)

    counted = (
        "SELECT (SELECT count(*) FROM incidents), (SELECT count(*) FROM notification_attempts),"
        " (SELECT count(*) FROM incident_events), (SELECT count(*) FROM escalation_actions),"
        " (SELECT count(*) FROM message_ledger), (SELECT count(*) FROM dead_letters)"
    )
    clock.advance(30)
    spool = open_spool(spool_dir, phone_network, clock)
    assert [r[1:] for r in reconcile(spool, county_url)] == [("opened", 2)]
    once = q(county_url, counted)
    assert once[0][:2] == (1, 3)  # the two pages and the call's retry
    assert reconcile(spool, county_url) == []  # nothing pending
    spool.close()

    # The commit happened, the "done" record did not: the entry is pending again.
    shutil.copy(before_marking, spool_dir / JOURNAL_FILE)
    spool = open_spool(spool_dir, phone_network, clock)
    assert [e.id for e in spool.pending()] == [entry.id]
    assert [r[1:] for r in reconcile(spool, county_url)] == [("already_stored", 0)]
    assert q(county_url, counted) == once
    assert q(county_url, "SELECT code FROM incidents") == [(entry.code,)]
    spool.close()


def test_a_cancel_spooled_after_its_press_stands_the_incident_down(
    county_url: str, phone_network: str, at_day: Pressing
) -> None:
    spool, clock, device = at_day.spool, at_day.clock, at_day.device
    entry = spool.record(press(device, DAY)).entry
    spool.page(entry)
    cancel = spool.record(press(device, DAY + timedelta(seconds=10), msg_id="m2", action="cancel")).entry
    assert cancel.cancel
    assert spool.page(cancel) == ()  # a cancel pages nobody
    clock.advance(60)
    results = reconcile(spool, county_url)
    assert [r[1] for r in results] == ["opened", "cancel"]
    assert q(county_url, "SELECT state FROM incidents") == [("cancelled",)]


def test_an_entry_reconciled_before_it_was_paged_is_paged_once_by_the_router(
    county_url: str, phone_network: str, at_day: Pressing
) -> None:
    """The database came back between record and page: the spool no longer pages it, the router does."""
    spool, clock, device = at_day.spool, at_day.clock, at_day.device
    entry = spool.record(press(device, DAY)).entry
    assert [r[1:] for r in reconcile(spool, county_url)] == [("opened", 0)]
    assert spool.page(entry) == ()
    assert calls(phone_network) == []
    make_router(county_url, phone_network, clock).run_once()
    assert len(calls(phone_network)) == 1
    assert len(messages(phone_network)) == 1
    assert entry.code in messages(phone_network)[0]["body"]  # the incident took the spool's code


def test_an_alarm_the_database_makes_no_incident_of_still_gets_one(
    county_url: str, phone_network: str, at_day: Pressing
) -> None:
    """An SOS on a malformed alarm topic (``…/sos/x``) of a known wristband: paged, then one incident."""
    spool, device = at_day.spool, at_day.device
    received = dataclasses.replace(press(device, DAY), topic=f"shouhu/v1/wristband/{device}/sos/x")
    entry = spool.record(received).entry
    pages = spool.page(entry)
    assert {p.outcome for p in pages} == {SendOutcome.SENT}
    [(incident, result, recorded)] = reconcile(spool, county_url)
    # Today's store_message dead-letters the topic, so the spool opens the operators'
    # fallback incident; once the hub pages such topics itself, the normal one.
    assert result in ("fallback", "opened")
    assert recorded == 2
    assert q(county_url, "SELECT id, code FROM incidents") == [(incident, entry.code)]
    assert len(first_page_attempts(county_url)) == 2


# -- PostgreSQL stopped for real ---------------------------------------------------------


def test_sos_while_postgresql_is_stopped_immediate_is_paged_then_reconciled(
    own_postgres: tuple[LocalPostgres, str], phone_network: str, spool_dir: Path
) -> None:
    cluster, url = own_postgres
    device, _grid, _resident = wristband_in(url, night_covered=False)
    clock = Clock(DAY)
    spool = open_spool(spool_dir, phone_network, clock)
    refreshed(spool, url, DAY - timedelta(seconds=30))
    cluster.stop("immediate")  # pg_ctl stop -m immediate: a crash, no shutdown checkpoint
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=3)

    received = press(device, DAY)
    started = time.monotonic()
    entry = spool.record(received).entry
    pages = spool.page(entry)
    assert time.monotonic() - started < 10
    assert pages
    assert all(p.outcome is SendOutcome.SENT for p in pages)
    assert len(calls(phone_network)) == 1
    spool.close()  # and the hub restarts during the outage
    spool = open_spool(spool_dir, phone_network, clock)
    assert spool.record(received).new is False

    cluster.start()
    clock.advance(90)
    assert [r[1:] for r in reconcile(spool, url)] == [("opened", 2)]
    make_router(url, phone_network, clock).run_once()
    assert len(calls(phone_network)) == 1  # no second first page
    assert q(url, "SELECT code FROM incidents") == [(entry.code,)]
    assert {(r[2], r[3]) for r in first_page_attempts(url)} == {("voice", "sent"), ("sms", "sent"), ("console", "sent")}
    spool.close()


def test_the_spool_directory_defaults_under_the_data_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One spool per hub identity under the data directory; SHOUHU_SPOOL_DIR overrides it."""
    monkeypatch.setenv("SHOUHU_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("SHOUHU_HUB_ID", "hub-east")
    monkeypatch.delenv("SHOUHU_SPOOL_DIR", raising=False)
    assert Settings(_env_file=None).spool_path == tmp_path / "data" / "spool" / "hub-east"  # type: ignore[call-arg]
    monkeypatch.delenv("SHOUHU_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    if os.geteuid() == 0:
        assert settings.spool_path == Path("/var/lib/shouhu/spool/hub-east")
    else:
        assert settings.spool_path == tmp_path / "shouhu" / "spool" / "hub-east"
    monkeypatch.setenv("SHOUHU_SPOOL_DIR", str(tmp_path / "elsewhere"))
    assert Settings(_env_file=None).spool_path == tmp_path / "elsewhere"  # type: ignore[call-arg]


def test_the_spool_pages_through_the_secondary_provider_when_the_primary_refuses(
    county: str, phone_network: str, aliyun_sim: str, spool_dir: Path
) -> None:
    """Issue 17: an area's pages must not depend on one provider even while the database
    is down. Twilio (the primary) answers 503; the spool's pages go out through Aliyun."""
    settings = Settings.model_validate(
        ALIYUN_SETTINGS
        | {
            "aliyun_endpoint": aliyun_sim,
            "twilio_account_sid": PHONE_SID,
            "twilio_auth_token": PHONE_TOKEN,
            "twilio_from": FROM,
            "twilio_api_base": phone_network,
            "public_url": NO_API,
            "phone_primary": "twilio",
            "phone_secondary": "aliyun",
            "spool_dir": str(spool_dir),
            "hub_id": HUB,
        }
    )
    httpx.post(f"{phone_network}/_sim/faults", json={"to": "*", "fail": "unavailable"}).raise_for_status()
    spool = Spool.from_settings(settings, clock=Clock(DAY))
    try:
        refreshed(spool, county, DAY - timedelta(minutes=1))
        entry = spool.record(press(WRISTBAND, DAY)).entry
        pages = spool.page(entry)
    finally:
        spool.close()
    assert {(p.recipient.phone, p.channel.value, p.outcome) for p in pages} == {
        (WORKER, "voice", SendOutcome.SENT),
        (WORKER, "sms", SendOutcome.SENT),
    }
    taken = [r for r in httpx.get(f"{aliyun_sim}/_sim/requests").json() if r["provider_id"]]
    assert sorted(r["action"] for r in taken) == ["IvrCall", "SendSms"]
    assert {r["to"] for r in taken} == {WORKER.removeprefix("+86")}
    assert calls(phone_network) == []
