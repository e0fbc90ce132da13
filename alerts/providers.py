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
from zoneinfo import ZoneInfo

from prometheus_client import Counter

from alerts.notifiers.base import Notifier, Provider
from devices.kinds import Channel
from shouhu.db import Conn

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
