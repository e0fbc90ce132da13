"""Issue 17: which provider pages whom, and failing over from the primary to the secondary.

Two real phone networks (the Twilio-compatible simulator, twice): the primary and the
secondary provider. A page the primary refuses (503) or never answers (a hung
provider, given up at the notifier's own timeout) reaches the person through the
secondary within 10 s; a secondary failing alone changes nothing; both failing alarm
the consoles and the operators, and the step advances as after any failure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, get_args

import httpx
import psycopg
import pytest
import typer
from prometheus_client import REGISTRY
from psycopg.rows import dict_row

from alerts.attempts import record_status
from alerts.notifiers.base import Provider
from alerts.notifiers.console import ConsoleNotifier
from alerts.notifiers.twilio import HTTP_TIMEOUT_S, TwilioNotifier
from alerts.providers import PhoneProviders, ProviderChoice, choice_for_area
from alerts.retry import BACKOFF_S, after_failure
from alerts.router import Router, RouterConfig
from alerts.states import AttemptState
from api.consoles.i18n import Lang
from api.consoles.queries import timeline
from api.consoles.story import event_line
from devices.registry import load_registry
from devices.registry_file import PhoneProvider, PhoneProvidersEntry, parse_registry
from launch.wiring import check_area_providers, phone_providers
from shouhu.settings import Settings
from simulators.phone_network import create_phone_network
from tests.support.database import DEMO_COUNTY
from tests.support.escalation import (
    DAY,
    FROM,
    PHONE_SID,
    PHONE_TOKEN,
    ZONE,
    Clock,
    HangingProvider,
    calls,
    messages,
    press,
    q,
    wristband_in,
)
from tests.support.services import serve_app

# Within this long of a send starting, its page is out on the secondary (issue 17).
FAILOVER_S = 10.0
PRIMARY, SECONDARY = Provider.TWILIO, Provider.ALIYUN


@pytest.fixture
def second_network() -> Iterator[str]:
    """A second Twilio-compatible network: the secondary provider's, until Aliyun's simulator is wired in."""
    yield from serve_app(create_phone_network(PHONE_SID, PHONE_TOKEN, announce=lambda _line: None))


def _router(url: str, primary: str, secondary: str, clock: Any, *, choice: ProviderChoice | None = None) -> Router:
    """A router with ``primary`` as Twilio and ``secondary`` standing in for Aliyun: Twilio first, then Aliyun."""

    def notifier(base: str) -> TwilioNotifier:
        return TwilioNotifier(PHONE_SID, PHONE_TOKEN, FROM, base, "http://127.0.0.1:9")

    phone = PhoneProviders.of(
        {PRIMARY: notifier(primary), SECONDARY: notifier(secondary)}, choice or ProviderChoice(PRIMARY, SECONDARY)
    )
    return Router(url, RouterConfig("r1", ZONE), phone, console=ConsoleNotifier(), clock=clock)


def _fail(base: str, fail: str, to: str = "*") -> None:
    httpx.post(f"{base}/_sim/faults", json={"to": to, "fail": fail}).raise_for_status()


def _first_step_phones(url: str, incident: int) -> set[str]:
    rows = q(
        url,
        "SELECT DISTINCT address FROM notification_attempts WHERE incident_id = %s AND step = 0 AND round = 0"
        " AND purpose = 'page' AND channel IN ('voice', 'sms')",
        incident,
    )
    return {str(r[0]) for r in rows}


def _reached(base: str) -> set[tuple[str, str]]:
    """(channel, number) of every call and SMS the network at ``base`` accepted."""
    return {("voice", c["to"]) for c in calls(base)} | {("sms", m["to"]) for m in messages(base)}


def _attempts(url: str, incident: int) -> list[tuple[Any, ...]]:
    return q(
        url,
        "SELECT address, channel, attempt, provider, state FROM notification_attempts WHERE incident_id = %s"
        " AND purpose = 'page' AND channel IN ('voice', 'sms') ORDER BY address, channel, attempt",
        incident,
    )


def _events(url: str, incident: int, name: str) -> list[dict[str, Any]]:
    rows = q(
        url, "SELECT detail FROM incident_events WHERE incident_id = %s AND event = %s ORDER BY id", incident, name
    )
    return [dict(r[0]) for r in rows]


def _story(url: str, incident: int, name: str) -> list[str]:
    """The console's story lines (in Chinese) for the incident's ``name`` events."""
    with psycopg.connect(url, row_factory=dict_row) as conn:
        lines = [event_line(Lang.ZH, e, {}) for e in timeline(conn, incident) if e.event == name]
    return [line.headline for line in lines if line is not None]


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- which provider pages whom ---------------------------------------------------------------


def test_the_registry_names_providers_as_the_notifier_interface_does() -> None:
    assert set(get_args(PhoneProvider)) == {p.value for p in Provider}


def test_an_area_inherits_its_parents_providers_then_the_default(county_url: str) -> None:
    registry = parse_registry(DEMO_COUNTY)
    _device, grid, _resident = wristband_in(county_url, night_covered=False)
    with psycopg.connect(county_url) as conn:
        chain = [r[0] for r in conn.execute(_CHAIN, (grid,)).fetchall()]  # grid … county
        default = ProviderChoice(PRIMARY)
        assert choice_for_area(conn, grid, default) == default
        entries = [PhoneProvidersEntry(area=chain[-1], primary="twilio", secondary="aliyun")]
        load_registry(conn, registry.model_copy(update={"phone_providers": entries}))
        assert choice_for_area(conn, grid, default) == ProviderChoice(PRIMARY, SECONDARY)
        entries.append(PhoneProvidersEntry(area=chain[1], primary="aliyun"))
        load_registry(conn, registry.model_copy(update={"phone_providers": entries}))
        assert choice_for_area(conn, grid, default) == ProviderChoice(SECONDARY)
        assert choice_for_area(conn, chain[-1], default) == ProviderChoice(PRIMARY, SECONDARY)
        assert choice_for_area(conn, None, default) == default
    # A provider named for an area must be configured: Aliyun is not, here.
    twilio_only = phone_providers(Settings(twilio_account_sid=PHONE_SID, twilio_auth_token="t", twilio_from=FROM))
    assert twilio_only.default == ProviderChoice(PRIMARY)  # the default default: the one configured
    with pytest.raises(typer.Exit):
        check_area_providers(county_url, twilio_only)
    assert twilio_only.unconfigured(ProviderChoice(SECONDARY)) == [
        ("primary", "aliyun is not configured (set SHOUHU_ALIYUN_ACCESS_KEY_ID and SHOUHU_ALIYUN_ACCESS_KEY_SECRET)")
    ]


_CHAIN = """
    WITH RECURSIVE up(id, parent_id, depth) AS (
        SELECT id, parent_id, 0 FROM areas WHERE id = %s
        UNION ALL SELECT a.id, a.parent_id, up.depth + 1 FROM areas a JOIN up ON a.id = up.parent_id
    ) SELECT id FROM up ORDER BY depth
"""


def test_a_secondary_named_in_the_settings_must_be_configured() -> None:
    settings = Settings(
        twilio_account_sid=PHONE_SID,
        twilio_auth_token="t",
        twilio_from=FROM,
        phone_primary="twilio",
        phone_secondary="aliyun",
    )
    with pytest.raises(typer.Exit):
        phone_providers(settings)
    with pytest.raises(ValueError, match="secondary"):
        PhoneProvidersEntry(area="county", primary="twilio", secondary="twilio")


def test_the_request_timeout_leaves_room_to_fail_over_within_10_s() -> None:
    assert HTTP_TIMEOUT_S <= FAILOVER_S - 3


# --- failover ------------------------------------------------------------------------------


def test_a_primary_refusing_with_503_pages_through_the_secondary_at_once(
    county_url: str, phone_network: str, second_network: str
) -> None:
    _fail(phone_network, "unavailable")
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    clock = Clock(DAY)
    router = _router(county_url, phone_network, second_network, clock)
    fallbacks = _metric("shouhu_provider_fallbacks_total", failed="twilio", to="aliyun")
    started = time.monotonic()
    incident = press(county_url, device, DAY)
    try:
        router.run_once()
    finally:
        router.close()
    elapsed = time.monotonic() - started
    phones = _first_step_phones(county_url, incident)
    assert phones
    assert _reached(second_network) == {(c, p) for p in phones for c in ("voice", "sms")}
    assert _reached(phone_network) == set()
    assert elapsed < FAILOVER_S
    rows = _attempts(county_url, incident)
    assert {(a, c, n, p, s) for a, c, n, p, s in rows} == {
        (phone, channel, n, provider, state)
        for phone in phones
        for channel in ("voice", "sms")
        for n, provider, state in ((1, "twilio", "failed"), (2, "aliyun", "sent"))
    }
    events = _events(county_url, incident, "provider_fallback")
    assert len(events) == 2 * len(phones)
    assert {(e["failed"], e["to_provider"]) for e in events} == {("twilio", "aliyun")}
    assert all("503" in e["error"] for e in events), events
    assert _events(county_url, incident, "providers_down") == []
    assert set(_story(county_url, incident, "provider_fallback")) == {
        "呼叫失败（twilio：twilio error 20503 (HTTP 503): Service unavailable），改由aliyun发送"
    }
    assert _metric("shouhu_provider_fallbacks_total", failed="twilio", to="aliyun") - fallbacks == len(events)


def test_a_hung_primary_is_given_up_and_the_page_goes_out_on_the_secondary_within_10_s(
    county_url: str, second_network: str
) -> None:
    """The primary takes every request and never answers; each channel's senders give it up at
    the notifier's timeout and send the page through the secondary at once."""
    hung = HangingProvider()
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    router = _router(county_url, hung.url, second_network, Clock(DAY))
    thread = threading.Thread(target=lambda: router.run(poll_s=0.05, senders=2), daemon=True)
    started = time.monotonic()
    incident = press(county_url, device, DAY)
    thread.start()
    try:
        wanted: set[tuple[str, str]] = set()
        while not wanted or not wanted <= _reached(second_network):
            assert time.monotonic() - started < FAILOVER_S, f"{_reached(second_network)} of {wanted} within 10 s"
            wanted = {(c, p) for p in _first_step_phones(county_url, incident) for c in ("voice", "sms")}
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        router.stop()
        hung.close()
        thread.join(20)
    assert len(hung.requests) == len(wanted), "the hung primary was not asked first"
    assert HTTP_TIMEOUT_S <= elapsed < FAILOVER_S
    assert {(e["failed"], e["to_provider"]) for e in _events(county_url, incident, "provider_fallback")} == {
        ("twilio", "aliyun")
    }


def test_a_secondary_failing_alone_changes_nothing_on_the_primary_path(
    county_url: str, phone_network: str, second_network: str
) -> None:
    _fail(second_network, "unavailable")
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    router = _router(county_url, phone_network, second_network, Clock(DAY))
    incident = press(county_url, device, DAY)
    try:
        router.run_once()
    finally:
        router.close()
    phones = _first_step_phones(county_url, incident)
    assert _reached(phone_network) == {(c, p) for p in phones for c in ("voice", "sms")}
    assert _reached(second_network) == set()
    assert {(n, p, s) for _a, _c, n, p, s in _attempts(county_url, incident)} == {(1, "twilio", "sent")}
    assert _events(county_url, incident, "provider_fallback") == []


def test_a_transient_failure_is_retried_on_the_same_provider(
    county_url: str, phone_network: str, second_network: str
) -> None:
    """A busy line is the callee, not the provider: the retry goes out on the primary again."""
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    clock = Clock(DAY)
    router = _router(county_url, phone_network, second_network, clock)
    incident = press(county_url, device, DAY)
    try:
        router.run_once()
        worker = sorted(_first_step_phones(county_url, incident))[0]
        # The call's status callback says busy, as api/routes/callbacks.py records it.
        with psycopg.connect(county_url) as conn:
            found = conn.execute(
                "SELECT id FROM notification_attempts WHERE incident_id = %s AND address = %s AND channel = 'voice'",
                (incident, worker),
            ).fetchone()
            assert found is not None
            record_status(conn, int(found[0]), AttemptState.BUSY, None, clock())
            assert after_failure(conn, int(found[0]), clock()) == "retry"
        clock.advance(BACKOFF_S[0])
        router.run_once()
    finally:
        router.close()
    voice = [(n, p, s) for a, c, n, p, s in _attempts(county_url, incident) if a == worker and c == "voice"]
    assert voice == [(1, "twilio", "busy"), (2, "twilio", "sent")]
    assert _reached(second_network) == set()


def test_both_providers_down_alarm_the_consoles_and_the_step_advances(
    county_url: str, phone_network: str, second_network: str
) -> None:
    """Every page of the first step fails on both providers: the operators get a console alarm
    and `providers_down` is on the timeline; the page is retried as any failure, and when its
    tries are out the next step runs at once and pages every one of its people on both."""
    _fail(phone_network, "unavailable")
    _fail(second_network, "unavailable")
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    clock = Clock(DAY)
    router = _router(county_url, phone_network, second_network, clock)
    down = _metric("shouhu_providers_down_total", channel="voice")
    incident = press(county_url, device, DAY)
    try:
        router.run_once()
        phones = _first_step_phones(county_url, incident)
        assert {(n, p, s) for _a, _c, n, p, s in _attempts(county_url, incident)} == {
            (1, "twilio", "failed"),
            (2, "aliyun", "failed"),
            (3, "twilio", "pending"),  # the person's second try, after the backoff, on the primary
        }
        [alarm] = _events(county_url, incident, "providers_down")
        assert alarm["providers"] == ["twilio", "aliyun"]
        assert alarm["step"] == 0
        assert _story(county_url, incident, "providers_down") == ["电话服务商全部故障（twilio、aliyun），已告警值班员"]
        operators = q(
            county_url,
            "SELECT recipient_id, state, body FROM notification_attempts WHERE incident_id = %s"
            " AND channel = 'console' AND purpose = 'notice'",
            incident,
        )
        assert operators
        assert {s for _r, s, _b in operators} == {"sent"}
        assert all("twilio" in b and "aliyun" in b for _r, _s, b in operators)
        every_operator = {r[0] for r in q(county_url, "SELECT id FROM staff WHERE role = 'operator' AND active")}
        assert {r for r, _s, _b in operators} <= every_operator
        assert _metric("shouhu_providers_down_total", channel="voice") - down == len(phones)
        # The person's second and third tries, on the primary, as after any failure.
        clock.advance(BACKOFF_S[0])
        router.run_once()
        assert q(
            county_url,
            "SELECT count(*) FROM incident_events WHERE incident_id = %s"
            " AND event = 'step_started' AND (detail->>'step')::int = 1",
            incident,
        ) == [(0,)]
        clock.advance(BACKOFF_S[1])
        router.run_once()
    finally:
        router.close()
    advanced = _events(county_url, incident, "step_advanced")
    assert [a["reason"] for a in advanced] == ["every channel of the step failed"]
    guardians = {
        r[0]
        for r in q(
            county_url,
            "SELECT g.phone FROM guardians g JOIN incidents i ON i.resident_id = g.resident_id"
            " WHERE i.id = %s AND g.active",
            incident,
        )
    }
    assert guardians
    # Nobody of the next step left unpaged: each guardian's call and SMS went to both providers.
    tried = {
        (a, c, p)
        for a, c, p in q(
            county_url,
            "SELECT address, channel, provider FROM notification_attempts WHERE incident_id = %s AND step = 1"
            " AND purpose = 'page' AND sends > 0",
            incident,
        )
    }
    assert tried == {(g, c, p) for g in guardians for c in ("voice", "sms") for p in ("twilio", "aliyun")}
    assert len(_events(county_url, incident, "providers_down")) == 2  # once per step
