"""The one settings class: every ``SHOUHU_*`` environment variable of DESIGN.md.

Values come from the environment, then from ``.env`` in the working directory.
An empty database or MQTT URL means "use the embedded default".
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TWILIO_DEFAULT_API_BASE = "https://api.twilio.com"

PositiveSeconds = Annotated[int, Field(gt=0)]
# Acknowledged but not resolved this long: the incident goes back on the chain. The one
# default; everything else takes ``Settings.resolve_timeout_s``.
DEFAULT_RESOLVE_TIMEOUT_S = 1800
# How long each step of the built-in policies waits for an acknowledgement.
DEFAULT_ACK_TIMEOUT_S = 120
# How long after the press a wristband's cancel still stands an SOS down.
DEFAULT_CANCEL_WINDOW_S = 30
# How long a grid worker has for the follow-up visit after an SOS or a fall.
DEFAULT_FOLLOW_UP_DUE_S = 86400
# Retention of personal data (hub/retention.py). The audit log: at least 180 days, as
# China's Cybersecurity Law (网络安全法, art. 21) asks of network logs (six months).
DEFAULT_AUDIT_DAYS = 365
MIN_AUDIT_DAYS = 180
# An incident's location, once it is closed: long enough for the follow-up visit and a
# month's report to be checked against it.
DEFAULT_LOCATION_DAYS = 90
# Ended or expired console sessions, sign-in codes and sign-in attempts.
DEFAULT_SESSION_DAYS = 7
# Who was called and told what, once the incident or task closed: the numbers called,
# the texts sent, names and notes on the timeline, a task's note. Then masked or
# cleared, the record of who was called when kept. Never under the audit log's floor:
# a complaint about a response is answered from them as from the audit log.
DEFAULT_CONTACT_DAYS = 365
MIN_CONTACT_DAYS = 180
# A resident, guardian or staff member removed from the registry (deactivated): then
# anonymised, unless an open incident or task still needs them.
DEFAULT_REGISTRY_DAYS = 365
# SHOUHU_TIMEZONE's default: where duty rosters and local days are evaluated.
DEFAULT_TIMEZONE = "Asia/Shanghai"


def _default_watch_gateway_id() -> str:
    # Stable per host, as the hub's: the broker keeps the gateway's session (and the
    # receipts it is owed) across its restarts.
    return f"shouhu-watch-gateway-{socket.gethostname()}"[:64]


def _default_hub_id() -> str:
    # A stable id per host keeps the broker session (and its queued QoS 1 messages)
    # across restarts of the same hub.
    return f"shouhu-hub-{socket.gethostname()}"[:64]


class Settings(BaseSettings):
    """Shouhu's configuration, read from ``SHOUHU_*`` variables and ``.env``."""

    model_config = SettingsConfigDict(env_prefix="SHOUHU_", env_file=".env", extra="ignore", frozen=True)

    mqtt_url: str = ""
    # TLS to the broker (`mqtts://`): the CA that signed the broker's certificate (empty:
    # the system's), and a client certificate and key when the broker asks for one.
    mqtt_ca_file: str = ""
    mqtt_cert_file: str = ""
    mqtt_key_file: str = ""
    # The key every broker password is derived from (`shouhu broker credentials`).
    device_secret: str = ""
    database_url: str = ""
    hub_id: str = Field(default_factory=_default_hub_id, min_length=1, max_length=64)
    # Telemetry and health through `$share/shouhu/…` (several hubs split them). A lone
    # hub may turn it off: Mosquitto 2.0.11 restores only direct subscriptions after a
    # broker restart, so a direct one loses nothing published before the hub is back.
    hub_shared: bool = True
    # Where the hub keeps SOS presses it could not store (the database down) and the
    # roster snapshot it pages them from (hub/spool.py). Empty: ``<data dir>/spool``.
    spool_dir: str = ""
    # The address the API binds, and prints: loopback unless told otherwise (the
    # container sets 0.0.0.0, docker-compose.yml).
    api_host: str = Field(default="127.0.0.1", min_length=1)
    api_port: int = Field(default=8000, ge=1, le=65535)
    # Request bodies past this are refused (413) before authentication, while reading.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    metrics_port: int = Field(default=9100, ge=1, le=65535)
    public_url: str = "http://127.0.0.1:8000"
    # The proxies whose X-Forwarded-Proto and X-Forwarded-For the API believes
    # (uvicorn's forwarded_allow_ips: addresses, networks, or * for any).
    forwarded_allow_ips: str = "127.0.0.1"
    twilio_account_sid: str = ""
    twilio_auth_token: str = ""
    twilio_from: str = ""
    twilio_api_base: str = TWILIO_DEFAULT_API_BASE
    # Who carries voice and SMS pages (issue 17, docs/escalation.md "Choosing providers and
    # failover"): the default primary and the secondary a page fails over to, for every
    # area the registry's `phone_providers:` does not name. Empty primary: the one provider
    # configured; empty secondary: no failover. A provider named must be configured.
    phone_primary: Literal["", "twilio", "aliyun"] = ""
    phone_secondary: Literal["", "twilio", "aliyun"] = ""
    # Aliyun voice (dyvmsapi) and SMS (dysmsapi), alerts/notifiers/aliyun.py: the AccessKey,
    # one endpoint for both APIs (http(s)://host:port, the simulator's; empty: Aliyun's
    # own hosts), the caller number, the approved TTS and SMS templates' codes and the
    # SMS signature (docs/escalation.md, "Aliyun (阿里云) voice and SMS").
    aliyun_access_key_id: str = ""
    aliyun_access_key_secret: str = ""
    aliyun_endpoint: str = ""
    aliyun_voice_number: str = ""
    aliyun_tts_page_code: str = ""
    aliyun_tts_taken_code: str = ""
    aliyun_tts_declined_code: str = ""
    aliyun_sms_sign_name: str = ""
    aliyun_sms_page_template: str = ""
    aliyun_sms_notice_template: str = ""
    emergency_webhook_url: str = ""
    emergency_webhook_secret: str = ""
    # The Traccar bridge (`POST /callbacks/traccar`): the shared secret Traccar sends in
    # `X-Shouhu-Traccar-Secret`. Empty: every forward is refused.
    traccar_secret: str = ""
    # Aliyun's receipts (`POST /callbacks/aliyun/{token}/…`, docs/contract.md "Aliyun
    # receipts"): the unguessable token in the push URLs set in Aliyun's console. Empty:
    # every push is refused (404).
    aliyun_callback_token: str = ""
    ack_timeout_s: PositiveSeconds = DEFAULT_ACK_TIMEOUT_S
    resolve_timeout_s: PositiveSeconds = DEFAULT_RESOLVE_TIMEOUT_S
    cancel_window_s: PositiveSeconds = DEFAULT_CANCEL_WINDOW_S
    heartbeat_interval_s: PositiveSeconds = 60
    heartbeat_misses: Annotated[int, Field(ge=1)] = 3
    camera_offline_hold_s: PositiveSeconds = 300
    # Care between emergencies (issue #6; names beyond DESIGN.md's table, documented in
    # docs/escalation.md): a wristband offline or unworn this long gets a visit, due
    # within visit_due_s; a repair order is due within repair_due_s; overdue → one level up.
    visit_offline_hold_s: PositiveSeconds = 3600
    not_worn_hold_s: PositiveSeconds = 21600
    visit_due_s: PositiveSeconds = 14400
    repair_due_s: PositiveSeconds = 172800
    # Visits from the seeds (issue #15): an SOS or a fall resolved → a follow-up visit
    # (网格员探视) due within follow_up_due_s; a false alarm gets one only if
    # follow_up_false_alarms says so.
    follow_up_due_s: PositiveSeconds = DEFAULT_FOLLOW_UP_DUE_S
    follow_up_false_alarms: bool = False
    battery_low_pct: Annotated[int, Field(ge=1, le=99)] = 20
    battery_critical_pct: Annotated[int, Field(ge=1, le=99)] = 10
    # Staff sign-in (shouhu/accounts.py): a code sent by SMS works this long; at most so
    # many codes per phone and per client address within the window; so many wrong codes
    # or passwords within the window lock the account for sign_in_lockout_s.
    sign_in_code_ttl_s: PositiveSeconds = 300
    sign_in_window_s: PositiveSeconds = 900
    sign_in_codes_per_phone: Annotated[int, Field(ge=1)] = 3
    sign_in_codes_per_ip: Annotated[int, Field(ge=1)] = 10
    sign_in_max_failures: Annotated[int, Field(ge=1)] = 5
    sign_in_lockout_s: PositiveSeconds = 900
    timezone: str = DEFAULT_TIMEZONE
    retention_days: Annotated[int, Field(ge=1)] = 90
    dead_letter_days: Annotated[int, Field(ge=1)] = 14
    # Retention of personal data (docs/operations.md, "Retention of personal data").
    audit_days: Annotated[int, Field(ge=MIN_AUDIT_DAYS)] = DEFAULT_AUDIT_DAYS
    location_days: Annotated[int, Field(ge=1)] = DEFAULT_LOCATION_DAYS
    session_days: Annotated[int, Field(ge=1)] = DEFAULT_SESSION_DAYS
    contact_days: Annotated[int, Field(ge=MIN_CONTACT_DAYS)] = DEFAULT_CONTACT_DAYS
    registry_days: Annotated[int, Field(ge=1)] = DEFAULT_REGISTRY_DAYS
    # The watch gateway (`shouhu gateway watch`, docs/contract.md "Watch protocol"): the
    # address the 4G watches connect to (loopback unless told otherwise, as the API; the
    # container sets 0.0.0.0), its MQTT client id, and the registry YAML it reads the
    # wristbands' watch ids from (empty: none; an unknown watch's SOS still pages).
    watch_host: str = Field(default="127.0.0.1", min_length=1)
    watch_port: int = Field(default=5093, ge=1, le=65535)
    watch_gateway_id: str = Field(default_factory=_default_watch_gateway_id, min_length=1, max_length=64)
    registry_file: str = ""
    # Where `shouhu up` keeps the embedded database and records its URL for the other
    # verbs (docs/architecture.md); empty: /var/lib/shouhu as root, else $XDG_DATA_HOME/shouhu.
    data_dir: str = ""

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @field_validator("aliyun_endpoint")
    @classmethod
    def _aliyun_scheme(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("SHOUHU_ALIYUN_ENDPOINT must start with http:// or https://")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_scheme(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("mqtt", "mqtts"):
            raise ValueError("SHOUHU_MQTT_URL must start with mqtt:// or mqtts://")
        return value

    @model_validator(mode="after")
    def _tls_files_need_mqtts(self) -> Settings:
        if (self.mqtt_ca_file or self.mqtt_cert_file) and urlsplit(self.mqtt_url).scheme != "mqtts":
            raise ValueError("SHOUHU_MQTT_CA_FILE and SHOUHU_MQTT_CERT_FILE need an mqtts:// SHOUHU_MQTT_URL")
        if bool(self.mqtt_cert_file) != bool(self.mqtt_key_file):
            raise ValueError("SHOUHU_MQTT_CERT_FILE and SHOUHU_MQTT_KEY_FILE go together")
        return self

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        if value and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("SHOUHU_DATABASE_URL must start with postgresql://")
        return value

    @property
    def spool_path(self) -> Path:
        """``SHOUHU_SPOOL_DIR``, or ``spool/<SHOUHU_HUB_ID>`` under the data directory
        ``shouhu up`` uses: one spool per hub identity, so two hubs on one host (or in
        one test run) never share a journal, and a restarted hub finds its own."""
        if self.spool_dir:
            return Path(self.spool_dir)
        from shouhu.embedded.defaults import default_data_dir  # the embedded package is heavier

        return default_data_dir(self.data_dir) / "spool" / self.hub_id

    @property
    def zone(self) -> ZoneInfo:
        """The zone duty rosters and day boundaries are evaluated in."""
        return ZoneInfo(self.timezone)


def setting_env_names() -> list[str]:
    """Every environment variable name the settings read, for docs and compose checks."""
    return sorted(f"SHOUHU_{name.upper()}" for name in Settings.model_fields)
