"""The broker's accounts and what each may do, from the registry: `shouhu broker credentials`.

Every active device of the registry file gets a Mosquitto account named by its id, and
every hub, watch gateway and API its own. Passwords are never stored by Shouhu: each is
an HMAC of the account's name under ``SHOUHU_DEVICE_SECRET`` (a device's with its
``credential_version``), so the same secret and registry always give the same files,
and the secret alone re-issues them (docs/operations.md, "Broker credentials and ACLs").

The ACL (Mosquitto's ``acl_file``) gives each device its own kind's channels and no
other, as ``user`` blocks: a ``pattern`` with ``%u`` cannot tell a wristband from a
camera, so it would let a camera publish a wristband SOS under its own id. The reads a
device needs — its receipts and commands — are the same for every account, so they are
two ``pattern`` lines. An account Mosquitto does not find in the password file cannot
connect at all: a device removed from the registry (deactivated) is refused once the
broker re-reads both files (SIGHUP).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from devices.contract import CHANNELS_OF_KIND, TOPIC_PREFIX
from devices.kinds import DeviceKind
from devices.registry_file import RegistryFile
from shouhu.mosquitto_passwd import SALT_BYTES, password_line

# A secret shorter than this is a placeholder, not a key.
MIN_SECRET_CHARS = 16
PASSWORD_CHARS = 32


class AccountRole(StrEnum):
    WRISTBAND = "wristband"
    CAMERA = "camera"
    HUB = "hub"
    GATEWAY = "gateway"
    API = "api"


@dataclass(frozen=True, slots=True)
class Account:
    """One broker account: its name (the MQTT user name), role, password and topics."""

    name: str
    role: AccountRole
    password: str
    salt: bytes
    writes: tuple[str, ...]
    reads: tuple[str, ...]


# Every account, devices included, may read the receipts and commands addressed to its
# own name: a device its own, a service account nothing anyone publishes.
DEVICE_READ_PATTERNS = (
    f"{TOPIC_PREFIX}/{DeviceKind.WRISTBAND}/%u/receipt",
    f"{TOPIC_PREFIX}/{DeviceKind.WRISTBAND}/%u/command",
)
_WRISTBANDS = f"{TOPIC_PREFIX}/{DeviceKind.WRISTBAND}/+"
# What a gateway or the Traccar bridge publishes for any wristband (never status: a
# watch's liveness comes through its telemetry).
_BRIDGED = tuple(f"{_WRISTBANDS}/{channel}" for channel in ("sos", "fall", "telemetry"))


class SecretTooShort(ValueError):
    """``SHOUHU_DEVICE_SECRET`` is empty or shorter than ``MIN_SECRET_CHARS``."""


def _derive(secret: str, purpose: str) -> bytes:
    if len(secret) < MIN_SECRET_CHARS:
        raise SecretTooShort(f"SHOUHU_DEVICE_SECRET must be at least {MIN_SECRET_CHARS} characters")
    return hmac.new(secret.encode(), purpose.encode(), hashlib.sha256).digest()


def account_password(secret: str, name: str, version: int = 1) -> str:
    """The password of account ``name`` at ``version``: 32 URL-safe characters (192 bits)."""
    digest = _derive(secret, f"shouhu-broker-password:{name}:{version}")
    return base64.urlsafe_b64encode(digest).decode()[:PASSWORD_CHARS]


def _salt(secret: str, name: str, version: int) -> bytes:
    # Derived, not random, so regenerating from an unchanged registry changes no byte.
    return _derive(secret, f"shouhu-broker-salt:{name}:{version}")[:SALT_BYTES]


def _account(
    secret: str, name: str, role: AccountRole, writes: Iterable[str], reads: Iterable[str], version: int = 1
) -> Account:
    return Account(
        name, role, account_password(secret, name, version), _salt(secret, name, version), tuple(writes), tuple(reads)
    )


def device_accounts(registry: RegistryFile, secret: str) -> list[Account]:
    """An account for each device of the file (a device missing from it has none)."""
    accounts = []
    for device in registry.devices:
        channels = sorted(CHANNELS_OF_KIND[device.kind])
        writes = [f"{TOPIC_PREFIX}/{device.kind}/{device.id}/{channel}" for channel in channels]
        accounts.append(
            _account(secret, device.id, AccountRole(device.kind.value), writes, (), device.credential_version)
        )
    return accounts


def service_accounts(secret: str, hubs: Sequence[str], gateways: Sequence[str], apis: Sequence[str]) -> list[Account]:
    """The hubs' (named by ``SHOUHU_HUB_ID``), the watch gateways' (by
    ``SHOUHU_WATCH_GATEWAY_ID``) and the API's or operators' accounts."""
    accounts = [
        _account(
            secret,
            hub,
            AccountRole.HUB,
            (f"{_WRISTBANDS}/receipt", f"shouhu/hub/{hub}/#"),
            (f"{TOPIC_PREFIX}/#", f"shouhu/hub/{hub}/#"),
        )
        for hub in hubs
    ]
    accounts += [
        _account(
            secret,
            gateway,
            AccountRole.GATEWAY,
            (*_BRIDGED, f"{_WRISTBANDS}/command_result", f"{TOPIC_PREFIX}/gateway/{gateway}/dead_letter"),
            (f"{_WRISTBANDS}/receipt", f"{_WRISTBANDS}/command"),
        )
        for gateway in gateways
    ]
    accounts += [
        _account(
            secret, api, AccountRole.API, (*_BRIDGED, f"{_WRISTBANDS}/command"), (f"{_WRISTBANDS}/command_result",)
        )
        for api in apis
    ]
    return accounts


def all_accounts(
    registry: RegistryFile, secret: str, hubs: Sequence[str], gateways: Sequence[str], apis: Sequence[str]
) -> list[Account]:
    """Service accounts, then devices. Raises ``ValueError`` when two share a name."""
    accounts = service_accounts(secret, hubs, gateways, apis) + device_accounts(registry, secret)
    seen: dict[str, AccountRole] = {}
    for account in accounts:
        if account.name in seen:
            raise ValueError(f"account {account.name!r} is both a {seen[account.name]} and a {account.role}")
        seen[account.name] = account.role
    return accounts


def password_file_text(accounts: Iterable[Account]) -> str:
    """Mosquitto's ``password_file``."""
    return "".join(password_line(a.name, a.password, a.salt) + "\n" for a in accounts)


def acl_file_text(accounts: Iterable[Account], source: str) -> str:
    """Mosquitto's ``acl_file``: the shared read patterns, then one block per account."""
    lines = [
        f"# Written by `shouhu broker credentials` from {source}; regenerate, do not edit.",
        "# Mosquitto re-reads it, with the password file, on SIGHUP.",
        *(f"pattern read {topic}" for topic in DEVICE_READ_PATTERNS),
    ]
    for account in accounts:
        lines += ["", f"# {account.role}", f"user {account.name}"]
        lines += [f"topic write {topic}" for topic in account.writes]
        lines += [f"topic read {topic}" for topic in account.reads]
    return "\n".join(lines) + "\n"


def credentials_csv_rows(accounts: Iterable[Account]) -> list[tuple[str, str, str]]:
    """(account, role, password) for provisioning devices and the services' URLs."""
    return [(a.name, a.role.value, a.password) for a in accounts]
