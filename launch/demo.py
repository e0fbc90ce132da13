"""The demo and the simulated providers beside ``shouhu up``: the demo county, a phone
network and an emergency platform on local ports, and the first SOS press.

A demo never reaches a real phone network or platform: a provider address that is
not on this host is refused.
"""

from __future__ import annotations

import asyncio
from contextlib import ExitStack
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import typer

from launch.output import fail
from launch.wiring import start_thread
from shouhu.settings import TWILIO_DEFAULT_API_BASE, Settings

if TYPE_CHECKING:
    from starlette.types import ASGIApp

DEMO_COUNTY = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
DEMO_ACCOUNT_SID = "AC" + "de" * 16
DEMO_AUTH_TOKEN = "demo-auth-token"  # noqa: S105 - only ever sent to the local simulator
DEMO_FROM = "+12025550100"
DEMO_WEBHOOK_SECRET = "demo-webhook-secret"  # noqa: S105 - only ever sent to the local simulator
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# Short holds, so that within a minute of `shouhu up --demo` the simulated fleets have
# filled the technician board (repair orders) and the grid console (visits). A setting
# the user gave keeps its value.
DEMO_CARE = {
    "heartbeat_interval_s": 10,
    "camera_offline_hold_s": 20,
    "visit_offline_hold_s": 30,
    "not_worn_hold_s": 30,
}


class PhoneNetwork(StrEnum):
    """Where ``shouhu up`` sends SMS and calls."""

    TWILIO = "twilio"
    SIMULATE = "simulate"


def is_local(url: str) -> bool:
    """Does ``url`` point at this host?"""
    return (urlsplit(url).hostname or "") in LOCAL_HOSTS


def demo_twilio_credentials(settings: Settings) -> tuple[str, str]:
    """The account SID and token the simulator accepts: the user's, or the demo's."""
    return (
        settings.twilio_account_sid or DEMO_ACCOUNT_SID,
        settings.twilio_auth_token or DEMO_AUTH_TOKEN,
    )


def _quiet_http_protocol() -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol without the access log, for the simulators beside the API.

    uvicorn decides per connection from the process-wide ``uvicorn.access`` logger,
    which the API's own server turns on (``access_log=False`` in a Config is not
    consulted), so the phone network's requests would fill the demo terminal.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class QuietH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.access_log = False

    return QuietH11Protocol


def _serve_beside(app: ASGIApp, name: str, stack: ExitStack) -> int:
    """Serve a simulator on a free 127.0.0.1 port from a thread, stopped with ``stack``; the port."""
    import uvicorn

    from shouhu.embedded.postgres import free_port

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=_quiet_http_protocol())
    server = uvicorn.Server(config)
    start_thread(server.run, name)
    stack.callback(setattr, server, "should_exit", True)
    return port


def _start_phone_network(settings: Settings, stack: ExitStack, sid: str, token: str) -> str:
    """Run the phone-network simulator beside the API, stopped with ``stack``; its base URL."""
    from simulators.phone_network import create_phone_network

    network = create_phone_network(
        sid,
        token,
        sms_url=f"http://127.0.0.1:{settings.api_port}/callbacks/twilio/sms",
        number=settings.twilio_from or DEMO_FROM,
    )
    base = f"http://127.0.0.1:{_serve_beside(network, 'phone-network', stack)}"
    typer.echo(f"phone network: simulated, {base} (no real phone is ever called)")
    return base


def simulated_phone_network(settings: Settings, stack: ExitStack) -> Settings:
    """``--phone-network simulate`` without ``--demo``: a staging county's pages go to the
    simulator, which prints them; every other setting stays the user's."""
    if settings.twilio_api_base != TWILIO_DEFAULT_API_BASE:
        typer.secho(
            f"--phone-network simulate: SHOUHU_TWILIO_API_BASE={settings.twilio_api_base} is not used", err=True
        )
    sid, token = demo_twilio_credentials(settings)
    base = _start_phone_network(settings, stack, sid, token)
    return settings.model_copy(
        update={
            "twilio_api_base": base,
            "twilio_account_sid": sid,
            "twilio_auth_token": token,
            "twilio_from": settings.twilio_from or DEMO_FROM,
        }
    )


def demo_providers(settings: Settings, stack: ExitStack) -> Settings:
    """Point Twilio and the emergency webhook at local simulators; refuse real providers."""
    base = settings.twilio_api_base
    if base != TWILIO_DEFAULT_API_BASE:
        if not is_local(base):
            fail(f"--demo refuses SHOUHU_TWILIO_API_BASE={base}: a demo never reaches a real phone network", 2)
        sid, token = demo_twilio_credentials(settings)
        typer.echo(f"phone network: {base} (yours)")
    else:
        sid, token = demo_twilio_credentials(settings)
        base = _start_phone_network(settings, stack, sid, token)
    webhook = settings.emergency_webhook_url
    secret = settings.emergency_webhook_secret or DEMO_WEBHOOK_SECRET
    if webhook:
        if not is_local(webhook):
            fail(f"--demo refuses SHOUHU_EMERGENCY_WEBHOOK_URL={webhook}: a demo never reaches a real platform", 2)
    else:
        from simulators.emergency_platform import create_emergency_platform

        platform_port = _serve_beside(create_emergency_platform(secret), "emergency-platform", stack)
        webhook = f"http://127.0.0.1:{platform_port}/cap"
        typer.echo(f"emergency platform: simulated, {webhook} (CAP status Exercise)")
    # The simulators call back the API they run beside: keypresses, SMS replies, statuses.
    public_url = settings.public_url
    if is_local(public_url):
        public_url = f"http://127.0.0.1:{settings.api_port}"
    settings = _demo_aliyun(settings, public_url, stack)
    return settings.model_copy(
        update={
            "public_url": public_url,
            "emergency_webhook_url": webhook,
            "emergency_webhook_secret": secret,
            "twilio_api_base": base,
            "twilio_account_sid": sid,
            "twilio_auth_token": token,
            "twilio_from": settings.twilio_from or DEMO_FROM,
        }
    )


DEMO_ALIYUN_TOKEN = "demo-aliyun-receipts"  # noqa: S105 - the local simulator's push path
# The demo's template codes: the simulator takes any; a real account has them approved.
DEMO_ALIYUN_TEMPLATES = {
    "aliyun_tts_page_code": "TTS_DEMO_PAGE",
    "aliyun_tts_taken_code": "TTS_DEMO_TAKEN",
    "aliyun_tts_declined_code": "TTS_DEMO_DECLINED",
    "aliyun_sms_sign_name": "守护",
    "aliyun_sms_page_template": "SMS_DEMO_PAGE",
    "aliyun_sms_notice_template": "SMS_DEMO_NOTICE",
}


def _demo_aliyun(settings: Settings, public_url: str, stack: ExitStack) -> Settings:
    """The simulated Aliyun beside the API as the demo's secondary phone provider: a page
    the phone network refuses goes out there (docs/escalation.md, failover)."""
    from simulators.aliyun import DEMO_ACCESS_KEY_ID, DEMO_ACCESS_KEY_SECRET, DEMO_VOICE_NUMBER, create_aliyun_service

    endpoint = settings.aliyun_endpoint
    if endpoint and not is_local(endpoint):
        fail(f"--demo refuses SHOUHU_ALIYUN_ENDPOINT={endpoint}: a demo never reaches a real phone provider", 2)
    token = settings.aliyun_callback_token or DEMO_ALIYUN_TOKEN
    key_id = settings.aliyun_access_key_id or DEMO_ACCESS_KEY_ID
    secret = settings.aliyun_access_key_secret or DEMO_ACCESS_KEY_SECRET
    if not endpoint:
        service = create_aliyun_service(
            key_id, secret, push_base=f"{public_url}/callbacks/aliyun/{token}", any_number=True
        )
        endpoint = f"http://127.0.0.1:{_serve_beside(service, 'aliyun', stack)}"
        typer.echo(
            f"aliyun: simulated, {endpoint}, the secondary phone provider: a page the phone network"
            " refuses goes out here (make it refuse: POST <phone network>/_sim/faults"
            ' {"to": "*", "fail": "unavailable"})'
        )
    update: dict[str, object] = {
        "aliyun_endpoint": endpoint,
        "aliyun_access_key_id": key_id,
        "aliyun_access_key_secret": secret,
        "aliyun_callback_token": token,
        "aliyun_voice_number": settings.aliyun_voice_number or DEMO_VOICE_NUMBER,
        "phone_primary": settings.phone_primary or "twilio",
        "phone_secondary": settings.phone_secondary or "aliyun",
    }
    update |= {name: value for name, value in DEMO_ALIYUN_TEMPLATES.items() if not getattr(settings, name)}
    return settings.model_copy(update=update)


def demo_care(settings: Settings) -> Settings:
    """The demo's short heartbeat and holds (:data:`DEMO_CARE`), where the user set none."""
    update = {name: value for name, value in DEMO_CARE.items() if name not in settings.model_fields_set}
    if update:
        shown = ", ".join(f"SHOUHU_{name.upper()}={value}" for name, value in update.items())
        typer.echo(f"demo: short holds, so visits and repair orders open within a minute: {shown}")
    return settings.model_copy(update=update)


def demo_press(url: str, broker_url: str, settings: Settings) -> None:
    """Press SOS on a wristband whose grid has a grid worker on duty now; the press is
    re-sent until the hub's receipt, which is printed (from a thread: nothing waits)."""
    from alerts.recipients import duty_chain
    from devices.registry import active_wristbands
    from shouhu.db import connect

    with connect(url) as conn:
        now = datetime.now(UTC)
        candidates = [(band, duty_chain(conn, band.grid_id, now, settings.zone)) for band in active_wristbands(conn)]
    # Prefer a grid whose own grid worker is on duty now, so the demo rings a 网格员.
    band, people = next(
        ((band, people) for band, people in candidates if people and people[0].area_id == band.grid_id),
        candidates[0],
    )
    who = ", ".join(f"{p.name} {p.phone}" for p in people) or "nobody"
    typer.echo(
        f"demo: {band.resident_name}'s wristband {band.device_id} (grid {band.grid_id}) presses SOS; on duty: {who}"
    )
    start_thread(lambda: _press_until_receipt(broker_url, band.device_id), "demo-press")
    typer.echo(
        "demo: press again with `shouhu simulate wristbands --press <id>` or "
        f"mosquitto_pub -q 1 -t shouhu/v1/wristband/<id>/sos -m '{{...}}' on {broker_url}"
    )


def _press_until_receipt(broker_url: str, device_id: str) -> None:
    from simulators.wristband import Wristband

    band = Wristband(broker_url, device_id)
    try:
        msg_id = band.alarm("sos", action="press")
        receipt = band.wait_for_receipt(msg_id, timeout=60)
    finally:
        band.close()
    if receipt is None:
        typer.secho(f"demo: no receipt for {device_id}'s press within 60 s", err=True, fg=typer.colors.RED)
    else:
        typer.echo(f"demo: {device_id}: receipt: incident {receipt.get('incident')} ({receipt.get('state')})")


def run_demo(url: str, broker_url: str, settings: Settings, watch_port: int, stack: ExitStack) -> None:
    """The demo's life: the first SOS press, then the simulated cameras, wristbands and
    4G watches (to the watch gateway on ``watch_port``) until ``stack`` closes."""
    import threading

    from launch.fleets import start_demo_fleets

    demo_press(url, broker_url, settings)
    stop = threading.Event()
    stack.callback(stop.set)
    start_demo_fleets(settings, broker_url, DEMO_COUNTY, watch_port, stop)
