"""Issue 17: which provider pages whom, and failing over from the primary to the secondary.

Real providers over HTTP: Twilio is the Twilio-compatible phone network, Aliyun the
Aliyun-compatible simulator driven by the official SDKs (``alerts/notifiers/aliyun.py``).
A page the primary refuses (503) or never answers (a hung provider, given up at the
notifier's own timeout) reaches the person through the secondary within 10 s, Twilio →
Aliyun and Aliyun → Twilio; a secondary failing alone changes nothing; both failing
alarm the consoles and the operators, and the step advances as after any failure.

A county of its own, on Chinese mobile numbers (Aliyun takes no other): one grid worker
and one operator on duty around the clock, one resident with one guardian.
"""

from __future__ import annotations

import threading
import time
from typing import Any, get_args

import httpx
import psycopg
import pytest
import typer
from prometheus_client import REGISTRY
from psycopg.rows import dict_row

from alerts.attempts import record_status
from alerts.notifiers import aliyun
from alerts.notifiers.aliyun import aliyun_notifiers
from alerts.notifiers.base import Notifier, Provider
from alerts.notifiers.console import ConsoleNotifier
from alerts.notifiers.twilio import HTTP_TIMEOUT_S, TwilioNotifier
from alerts.providers import CREDENTIALS, PhoneProviders, ProviderChoice, choice_for_area
from alerts.retry import BACKOFF_S, after_failure
from alerts.router import Router, RouterConfig
from alerts.states import AttemptState
from api.consoles.i18n import Lang
from api.consoles.queries import timeline
from api.consoles.story import event_line
from devices.kinds import Channel
from devices.registry import load_registry
from devices.registry_file import PhoneProvider, PhoneProvidersEntry, RegistryFile
from launch.wiring import check_area_providers, phone_providers
from shouhu.settings import Settings
from tests.support.aliyun import ALIYUN_SETTINGS, COUNTY, GUARDIAN, WORKER, WRISTBAND
from tests.support.escalation import DAY, FROM, PHONE_SID, PHONE_TOKEN, ZONE, Clock, HangingProvider, press, q

# Within this long of a send starting, its page is out on the secondary (issue 17).
FAILOVER_S = 10.0
TWILIO, ALIYUN = Provider.TWILIO, Provider.ALIYUN
def _aliyun(base: str) -> dict[Channel, Notifier]:
    """Aliyun's voice and SMS notifiers, built as the router builds them, against the simulator at ``base``."""
    return aliyun_notifiers(Settings.model_validate(ALIYUN_SETTINGS | {"aliyun_endpoint": base}))


def _router(url: str, twilio: str, aliyun_base: str, clock: Any, default: ProviderChoice | None = None) -> Router:
    """A router paging through Twilio at ``twilio`` and Aliyun at ``aliyun_base``; by default Twilio first."""
    twilio_notifier = TwilioNotifier(PHONE_SID, PHONE_TOKEN, FROM, twilio, "http://127.0.0.1:9")
    notifiers: dict[tuple[Provider, Channel], Notifier] = {(TWILIO, c): twilio_notifier for c in PHONES}
    notifiers |= {(ALIYUN, c): n for c, n in _aliyun(aliyun_base).items()}
    phone = PhoneProviders.build(notifiers, default or ProviderChoice(TWILIO, ALIYUN))
    return Router(url, RouterConfig("r1", ZONE), phone, console=ConsoleNotifier(), clock=clock)


PHONES = (Channel.VOICE, Channel.SMS)


def _fail(base: str, fail: str) -> None:
    """Every number of the provider at ``base`` fails so (both simulators take ``*``)."""
    httpx.post(f"{base}/_sim/faults", json={"to": "*", "fail": fail}).raise_for_status()


def _twilio_reached(base: str) -> set[tuple[str, str]]:
    """(channel, number) of every call and SMS the phone network accepted."""
    calls = httpx.get(f"{base}/_sim/calls").json()
    texts = httpx.get(f"{base}/_sim/messages").json()
    return {("voice", c["to"]) for c in calls} | {("sms", m["to"]) for m in texts}


def _aliyun_reached(base: str) -> set[tuple[str, str]]:
    """(channel, number) of every IvrCall and SendSms the Aliyun simulator accepted."""
    channel = {"IvrCall": "voice", "SendSms": "sms"}
    return {
        (channel[r["action"]], "+86" + r["to"][-11:])
        for r in httpx.get(f"{base}/_sim/requests").json()
        if r["provider_id"] and r["action"] in channel
    }


def _attempts(url: str, incident: int) -> set[tuple[Any, ...]]:
    """(number, channel, try, provider, state) of the incident's phone pages."""
    rows = q(
        url,
        "SELECT address, channel, attempt, provider, state FROM notification_attempts WHERE incident_id = %s"
        " AND purpose = 'page' AND channel IN ('voice', 'sms')",
        incident,
    )
    return set(rows)


def _events(url: str, incident: int, name: str) -> list[dict[str, Any]]:
    query = "SELECT detail FROM incident_events WHERE incident_id = %s AND event = %s ORDER BY id"
    return [dict(r[0]) for r in q(url, query, incident, name)]


def _story(url: str, incident: int, name: str) -> list[str]:
    """The console's story lines (in Chinese) for the incident's ``name`` events."""
    with psycopg.connect(url, row_factory=dict_row) as conn:
        lines = [event_line(Lang.ZH, e, {}) for e in timeline(conn, incident) if e.event == name]
    return [line.headline for line in lines if line is not None]


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


BOTH = {("voice", WORKER), ("sms", WORKER)}


def _press_and_page(url: str, router: Router) -> int:
    """The wristband's SOS, and one router pass: the first step's pages and what follows at once."""
    incident = press(url, WRISTBAND, DAY)
    try:
        router.run_once()
    finally:
        router.close()
    return incident


# --- which provider pages whom ---------------------------------------------------------------


def test_the_registry_names_providers_as_the_notifier_interface_does() -> None:
    assert set(get_args(PhoneProvider)) == {p.value for p in Provider}


def test_an_area_inherits_its_parents_providers_then_the_default(county: str) -> None:
    default = ProviderChoice(TWILIO)
    registry = RegistryFile.model_validate(COUNTY)
    with psycopg.connect(county) as conn:
        assert choice_for_area(conn, "grid1", default) == default
        entries = [PhoneProvidersEntry(area="county", primary="twilio", secondary="aliyun")]
        load_registry(conn, registry.model_copy(update={"phone_providers": entries}))
        assert choice_for_area(conn, "grid1", default) == ProviderChoice(TWILIO, ALIYUN)
        entries.append(PhoneProvidersEntry(area="shanli", primary="aliyun"))
        load_registry(conn, registry.model_copy(update={"phone_providers": entries}))
        assert choice_for_area(conn, "grid1", default) == ProviderChoice(ALIYUN)
        assert choice_for_area(conn, "county", default) == ProviderChoice(TWILIO, ALIYUN)
        assert choice_for_area(conn, None, default) == default
    # Twilio alone is configured: the default default is Twilio, and an area naming Aliyun is refused.
    twilio_only = phone_providers(Settings(twilio_account_sid=PHONE_SID, twilio_auth_token="t", twilio_from=FROM))
    assert twilio_only.default == ProviderChoice(TWILIO)
    with pytest.raises(typer.Exit):
        check_area_providers(county, twilio_only)
    assert twilio_only.unconfigured(ProviderChoice(ALIYUN)) == [
        ("primary", f"aliyun is not configured ({CREDENTIALS[ALIYUN]})")
    ]


def test_providers_named_in_the_settings_must_be_configured_and_differ() -> None:
    twilio = Settings(twilio_account_sid=PHONE_SID, twilio_auth_token="t", twilio_from=FROM)
    with pytest.raises(typer.Exit):
        phone_providers(twilio.model_copy(update={"phone_primary": "twilio", "phone_secondary": "aliyun"}))
    with pytest.raises(typer.Exit):
        phone_providers(twilio.model_copy(update={"phone_primary": "twilio", "phone_secondary": "twilio"}))
    with pytest.raises(ValueError, match="secondary"):
        PhoneProvidersEntry(area="county", primary="twilio", secondary="twilio")
    both = twilio.model_copy(update=ALIYUN_SETTINGS)
    with pytest.raises(typer.Exit):
        phone_providers(both)  # two providers: the primary must be named
    chosen = phone_providers(both.model_copy(update={"phone_primary": "aliyun", "phone_secondary": "twilio"}))
    assert chosen.default == ProviderChoice(ALIYUN, TWILIO)
    assert chosen.configured == {TWILIO, ALIYUN}


def test_each_providers_request_timeout_leaves_room_to_fail_over_within_10_s() -> None:
    assert HTTP_TIMEOUT_S <= FAILOVER_S - 3
    assert aliyun.HTTP_TIMEOUT_S <= FAILOVER_S - 3


# --- failover ------------------------------------------------------------------------------


def test_twilio_refusing_with_503_pages_through_aliyun_at_once(
    county: str, phone_network: str, aliyun_sim: str
) -> None:
    _fail(phone_network, "unavailable")
    router = _router(county, phone_network, aliyun_sim, Clock(DAY))
    fallbacks = _metric("shouhu_provider_fallbacks_total", failed="twilio", to="aliyun")
    failures = _metric("shouhu_provider_failures_total", provider="twilio", channel="voice")
    started = time.monotonic()
    incident = _press_and_page(county, router)
    elapsed = time.monotonic() - started
    assert _aliyun_reached(aliyun_sim) == BOTH
    assert _twilio_reached(phone_network) == set()
    assert elapsed < FAILOVER_S
    assert _attempts(county, incident) == {
        (WORKER, channel, n, provider, state)
        for channel in ("voice", "sms")
        for n, provider, state in ((1, "twilio", "failed"), (2, "aliyun", "sent"))
    }
    events = _events(county, incident, "provider_fallback")
    assert [(e["failed"], e["to_provider"], e["try"]) for e in events] == [("twilio", "aliyun", 2)] * 2
    assert set(_story(county, incident, "provider_fallback")) == {
        "呼叫失败（twilio：twilio error 20503 (HTTP 503): Unable to create record: Service unavailable），"
        "改由aliyun发送"
    }
    assert _events(county, incident, "providers_down") == []
    assert _metric("shouhu_provider_fallbacks_total", failed="twilio", to="aliyun") - fallbacks == 2
    assert _metric("shouhu_provider_failures_total", provider="twilio", channel="voice") - failures == 1


def test_a_hung_twilio_is_given_up_and_the_page_goes_out_on_aliyun_within_10_s(county: str, aliyun_sim: str) -> None:
    """Twilio takes every request and never answers; each channel's senders give it up at the
    notifier's timeout and send the page through Aliyun at once."""
    hung = HangingProvider()
    router = _router(county, hung.url, aliyun_sim, Clock(DAY))
    thread = threading.Thread(target=lambda: router.run(poll_s=0.05, senders=2), daemon=True)
    started = time.monotonic()
    incident = press(county, WRISTBAND, DAY)
    thread.start()
    try:
        while not _aliyun_reached(aliyun_sim) >= BOTH:
            assert time.monotonic() - started < FAILOVER_S, f"only {_aliyun_reached(aliyun_sim)} within 10 s"
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        router.stop()
        hung.close()
        thread.join(20)
    assert {(r["To"], r["path"].rsplit("/", 1)[-1]) for r in hung.requests} == {
        (WORKER, "Calls.json"),
        (WORKER, "Messages.json"),
    }, "Twilio, the primary, was not asked first"
    assert HTTP_TIMEOUT_S <= elapsed < FAILOVER_S
    fallbacks = _events(county, incident, "provider_fallback")
    assert {(e["failed"], e["to_provider"]) for e in fallbacks} == {("twilio", "aliyun")}
    assert all("no answer" in e["error"] for e in fallbacks), fallbacks


def test_an_area_on_aliyun_falls_back_to_twilio(county: str, phone_network: str, aliyun_sim: str) -> None:
    """The township names Aliyun first and Twilio second (registry): Aliyun refusing (503), the
    grid's pages reach the person through Twilio at once."""
    with psycopg.connect(county) as conn:
        entries = [PhoneProvidersEntry(area="shanli", primary="aliyun", secondary="twilio")]
        load_registry(conn, RegistryFile.model_validate(COUNTY | {"phone_providers": entries}))
    _fail(aliyun_sim, "error")
    router = _router(county, phone_network, aliyun_sim, Clock(DAY), default=ProviderChoice(TWILIO))
    started = time.monotonic()
    incident = _press_and_page(county, router)
    assert time.monotonic() - started < FAILOVER_S
    assert _twilio_reached(phone_network) == BOTH
    assert _aliyun_reached(aliyun_sim) == set()
    assert {(n, p, s) for _a, _c, n, p, s in _attempts(county, incident)} == {
        (1, "aliyun", "failed"),
        (2, "twilio", "sent"),
    }
    assert {(e["failed"], e["to_provider"]) for e in _events(county, incident, "provider_fallback")} == {
        ("aliyun", "twilio")
    }


def test_aliyun_failing_alone_changes_nothing_on_twilios_path(county: str, phone_network: str, aliyun_sim: str) -> None:
    _fail(aliyun_sim, "error")
    router = _router(county, phone_network, aliyun_sim, Clock(DAY))
    incident = _press_and_page(county, router)
    assert _twilio_reached(phone_network) == BOTH
    assert httpx.get(f"{aliyun_sim}/_sim/requests").json() == []
    assert {(n, p, s) for _a, _c, n, p, s in _attempts(county, incident)} == {(1, "twilio", "sent")}
    assert _events(county, incident, "provider_fallback") == []


def test_a_failure_of_the_callee_is_retried_on_the_same_provider(
    county: str, phone_network: str, aliyun_sim: str
) -> None:
    """A busy line is the callee, not the provider (a status callback never falls back):
    the next try goes out on Twilio again."""
    clock = Clock(DAY)
    router = _router(county, phone_network, aliyun_sim, clock)
    incident = press(county, WRISTBAND, DAY)
    try:
        router.run_once()
        # The call's status callback says busy, as api/routes/callbacks.py records it.
        with psycopg.connect(county) as conn:
            found = conn.execute(
                "SELECT id FROM notification_attempts WHERE incident_id = %s AND channel = 'voice'", (incident,)
            ).fetchone()
            assert found is not None
            record_status(conn, int(found[0]), AttemptState.BUSY, None, clock())
            assert after_failure(conn, int(found[0]), clock()) == "retry"
        clock.advance(BACKOFF_S[0])
        router.run_once()
    finally:
        router.close()
    voice = sorted((n, p, s) for _a, c, n, p, s in _attempts(county, incident) if c == "voice")
    assert voice == [(1, "twilio", "busy"), (2, "twilio", "sent")]
    assert httpx.get(f"{aliyun_sim}/_sim/requests").json() == []


def test_both_providers_down_alarm_the_consoles_and_the_step_advances(
    county: str, phone_network: str, aliyun_sim: str
) -> None:
    """Every page of the first step fails on both providers: the operator gets a console alarm
    and `providers_down` is on the timeline; the page is retried as after any failure, and when
    its tries are out the next step runs at once and pages its people on both providers."""
    _fail(phone_network, "unavailable")
    _fail(aliyun_sim, "error")
    clock = Clock(DAY)
    router = _router(county, phone_network, aliyun_sim, clock)
    down = _metric("shouhu_providers_down_total", channel="voice")
    incident = press(county, WRISTBAND, DAY)
    try:
        router.run_once()
        assert {(n, p, s) for _a, _c, n, p, s in _attempts(county, incident)} == {
            (1, "twilio", "failed"),
            (2, "aliyun", "failed"),
            (3, "twilio", "pending"),  # the person's second try, after the backoff, on the primary
        }
        [alarm] = _events(county, incident, "providers_down")
        assert alarm["providers"] == ["twilio", "aliyun"]
        assert alarm["step"] == 0
        assert _story(county, incident, "providers_down") == ["电话服务商全部故障（twilio、aliyun），已告警值班员"]
        notices = q(
            county,
            "SELECT recipient_id, state, body FROM notification_attempts WHERE incident_id = %s"
            " AND channel = 'console' AND purpose = 'notice'",
            incident,
        )
        assert [(r, s) for r, s, _b in notices] == [("op", "sent")]
        assert "twilio、aliyun" in notices[0][2]
        live = q(county, "SELECT payload->>'id' FROM live_events WHERE payload->>'change' = 'providers_down'")
        assert live == [(str(incident),)], "the consoles were not told on the live feed"
        assert _metric("shouhu_providers_down_total", channel="voice") - down == 1
        # The person's second and third tries, on the primary, as after any failure.
        clock.advance(BACKOFF_S[0])
        router.run_once()
        assert _events(county, incident, "step_advanced") == []
        clock.advance(BACKOFF_S[1])
        router.run_once()
    finally:
        router.close()
    assert [a["reason"] for a in _events(county, incident, "step_advanced")] == ["every channel of the step failed"]
    # Nobody of the next step left unpaged: the guardian's call and SMS went to both providers.
    tried = q(
        county,
        "SELECT DISTINCT address, channel, provider FROM notification_attempts WHERE incident_id = %s AND step = 1"
        " AND purpose = 'page' AND sends > 0",
        incident,
    )
    assert set(tried) == {(GUARDIAN, c, p) for c in ("voice", "sms") for p in ("twilio", "aliyun")}
    assert len(_events(county, incident, "providers_down")) == 2  # once per step
