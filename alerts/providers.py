"""Which provider carries a phone page, and failing over to the other one (issue 17).

Voice and SMS pages go out through a *provider* (Twilio, Aliyun). An area names its
primary and optionally a secondary provider in the registry (``phone_providers:``); an
area that names none inherits its parent's, up to the county, then the settings'
default (``SHOUHU_PHONE_PRIMARY`` / ``SHOUHU_PHONE_SECONDARY``), whose own default is
the one provider configured. Each attempt row records its provider: a retry keeps it;
a send that fails in a way retrying there cannot fix (``SendResult.fall_back``) is
tried again at once on the next provider of the choice (``alerts/retry.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from prometheus_client import Counter

from alerts.notifiers.base import Delivery, Notifier, Provider, SendOutcome, SendResult
from devices.kinds import Channel
from shouhu.db import Conn

if TYPE_CHECKING:
    from shouhu.settings import Settings

PHONE_CHANNELS = frozenset({Channel.VOICE, Channel.SMS})

FALLBACKS = Counter(
    "shouhu_provider_fallbacks_total",
    "Phone pages moved from a failing provider to the next one, by the provider that failed and the one taking over",
    ["failed", "to"],
)
PROVIDER_FAILURES = Counter(
    "shouhu_provider_failures_total",
    "Phone sends that failed in a way retrying on the same provider cannot fix (fall back), by provider and channel",
    ["provider", "channel"],
)
PROVIDERS_DOWN = Counter(
    "shouhu_providers_down_total",
    "Phone pages that failed on every provider of their choice (the console and the operators were alarmed)",
    ["channel"],
)


@dataclass(frozen=True, slots=True)
class ProviderChoice:
    """The providers that carry an area's phone pages, in the order they are tried."""

    primary: Provider
    secondary: Provider | None = None

    def __post_init__(self) -> None:
        if self.secondary == self.primary:
            raise ValueError(f"the secondary provider is the primary ({self.primary}): name another one or none")

    @property
    def order(self) -> tuple[Provider, ...]:
        return (self.primary,) if self.secondary is None else (self.primary, self.secondary)

    def next_after(self, tried: Iterable[Provider]) -> Provider | None:
        """The first provider of the choice not in ``tried``: where a page falls back to, or None."""
        done = set(tried)
        return next((p for p in self.order if p not in done), None)


@dataclass(frozen=True, slots=True)
class Failover:
    """What a failed phone send may fall back on: its area's choice, and the zone the
    operators' rosters are read in (they are alarmed when every provider failed)."""

    choice: ProviderChoice
    zone: ZoneInfo


@dataclass(frozen=True, slots=True)
class PhoneProviders:
    """The notifiers that carry phone pages, by (provider, channel), and the default choice.

    ``default`` is None when no provider is configured (``shouhu up`` without phone
    settings): voice and SMS are then not sent at all.
    """

    notifiers: Mapping[tuple[Provider, Channel], Notifier]
    default: ProviderChoice | None

    @classmethod
    def none(cls) -> PhoneProviders:
        return cls({}, None)

    @classmethod
    def of(cls, providers: Mapping[Provider, Notifier], default: ProviderChoice | None = None) -> PhoneProviders:
        """Each provider's notifier, for the phone channels it handles (:meth:`build`)."""
        return cls.build(
            {
                (provider, channel): notifier
                for provider, notifier in providers.items()
                for channel in notifier.channels & PHONE_CHANNELS
            },
            default,
        )

    @classmethod
    def build(
        cls, notifiers: Mapping[tuple[Provider, Channel], Notifier], default: ProviderChoice | None = None
    ) -> PhoneProviders:
        """The notifiers by (provider, channel); the default choice is ``default``, else the
        one provider given (several need an explicit default).

        Raises:
            ValueError: several providers and no default.
        """
        configured = {provider for provider, _channel in notifiers}
        if default is None and len(configured) == 1:
            default = ProviderChoice(next(iter(configured)))
        if default is None and configured:
            raise ValueError("several phone providers are configured: name the primary (SHOUHU_PHONE_PRIMARY)")
        return cls(dict(notifiers), default)

    @property
    def configured(self) -> frozenset[Provider]:
        return frozenset(provider for provider, _channel in self.notifiers)

    @property
    def channels(self) -> frozenset[Channel]:
        return frozenset(channel for _provider, channel in self.notifiers)

    def notifier(self, provider: Provider, channel: Channel) -> Notifier | None:
        return self.notifiers.get((provider, channel))

    def unconfigured(self, choice: ProviderChoice) -> list[tuple[str, str]]:
        """(field, why) for each provider of ``choice`` that is not configured: "primary" or "secondary"."""
        return [
            (field, f"{provider} is not configured ({CREDENTIALS[provider]})")
            for field, provider in (("primary", choice.primary), ("secondary", choice.secondary))
            if provider is not None and provider not in self.configured
        ]


# What makes a provider configured: its credentials (launch/wiring.py builds its notifier from them).
CREDENTIALS: dict[Provider, str] = {
    Provider.TWILIO: "set SHOUHU_TWILIO_ACCOUNT_SID, SHOUHU_TWILIO_AUTH_TOKEN and SHOUHU_TWILIO_FROM",
    Provider.ALIYUN: "set SHOUHU_ALIYUN_ACCESS_KEY_ID, SHOUHU_ALIYUN_ACCESS_KEY_SECRET and the voice or SMS settings",
}


def configured_notifiers(
    settings: Settings, *, timeout: float | None = None
) -> dict[tuple[Provider, Channel], Notifier]:
    """The notifier of each configured provider and phone channel (its credentials set);
    ``timeout`` bounds each request (the notifiers' own default when None)."""
    # Each SDK is imported only when its provider is configured: the Aliyun SDKs alone
    # take seconds to import on this hardware, and `shouhu hub` builds its spool's
    # notifiers before it takes its first SOS.
    limit = {} if timeout is None else {"timeout": timeout}
    notifiers: dict[tuple[Provider, Channel], Notifier] = {}
    if settings.twilio_account_sid and settings.twilio_auth_token and settings.twilio_from:
        from alerts.notifiers.twilio import TwilioNotifier

        twilio = TwilioNotifier.from_settings(settings, **limit)
        notifiers |= {(Provider.TWILIO, Channel.VOICE): twilio, (Provider.TWILIO, Channel.SMS): twilio}
    if settings.aliyun_access_key_id and settings.aliyun_access_key_secret:
        from alerts.notifiers.aliyun import aliyun_notifiers

        # A channel Aliyun is not configured for falls back to the other provider, if any.
        aliyun = aliyun_notifiers(settings, **limit)
        notifiers |= {(Provider.ALIYUN, channel): notifier for channel, notifier in aliyun.items()}
    return notifiers


def settings_choice(settings: Settings) -> ProviderChoice | None:
    """``SHOUHU_PHONE_PRIMARY`` / ``SHOUHU_PHONE_SECONDARY``; None when no primary is named.

    Raises:
        ValueError: a secondary without a primary, or the same provider twice (the
            message names the setting).
    """
    if not settings.phone_primary:
        if settings.phone_secondary:
            raise ValueError("SHOUHU_PHONE_SECONDARY is set but SHOUHU_PHONE_PRIMARY is not: name the primary too")
        return None
    secondary = Provider(settings.phone_secondary) if settings.phone_secondary else None
    try:
        return ProviderChoice(Provider(settings.phone_primary), secondary)
    except ValueError as exc:
        raise ValueError(f"SHOUHU_PHONE_SECONDARY: {exc}") from exc


@dataclass(slots=True)  # not frozen: the Notifier protocol's ``channels`` is a plain attribute
class ChainNotifier:
    """A delivery sent on ``choice``'s providers in turn, the next only when the one
    before failed in a way another provider may fix (``fall_back``): for a sender that
    keeps no attempt rows to fall back with — the hub's spool while the database is down."""

    phone: PhoneProviders
    choice: ProviderChoice
    channels: frozenset[Channel] = PHONE_CHANNELS

    def send(self, delivery: Delivery) -> SendResult:
        result = SendResult(SendOutcome.FAILED, error=f"no provider carries {delivery.channel}", fall_back=True)
        providers = [p for p in (self.choice.primary, self.choice.secondary) if p is not None]
        tried: Provider | None = None
        for provider in providers:
            notifier = self.phone.notifier(provider, delivery.channel)
            if notifier is None:
                continue
            if tried is not None:
                FALLBACKS.labels(tried.value, provider.value).inc()
            result = notifier.send(delivery)
            if result.outcome is SendOutcome.SENT or not result.fall_back:
                return result
            PROVIDER_FAILURES.labels(provider.value, delivery.channel.value).inc()
            tried = provider
        return result


def area_choices(conn: Conn) -> list[tuple[str, ProviderChoice]]:
    """Every area's own choice from the registry, as (area id, choice)."""
    rows = conn.execute(
        "SELECT area_id, primary_provider, secondary_provider FROM area_phone_providers ORDER BY area_id"
    ).fetchall()
    return [(str(area), _choice(primary, secondary)) for area, primary, secondary in rows]


def choice_for_area(conn: Conn, area_id: str | None, default: ProviderChoice) -> ProviderChoice:
    """The choice of the nearest area up the tree from ``area_id`` that names one, else ``default``."""
    if area_id is None:
        return default
    row = conn.execute(_NEAREST, (area_id,)).fetchone()
    return default if row is None else _choice(row[0], row[1])


def _choice(primary: str, secondary: str | None) -> ProviderChoice:
    return ProviderChoice(Provider(primary), Provider(secondary) if secondary else None)


_NEAREST = """
    WITH RECURSIVE up(id, parent_id, depth) AS (
        SELECT id, parent_id, 0 FROM areas WHERE id = %s
        UNION ALL
        SELECT a.id, a.parent_id, up.depth + 1 FROM areas a JOIN up ON a.id = up.parent_id
    )
    SELECT p.primary_provider, p.secondary_provider FROM up JOIN area_phone_providers p ON p.area_id = up.id
    ORDER BY up.depth LIMIT 1
"""
