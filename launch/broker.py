"""`shouhu broker credentials`: the broker's password and ACL files from the registry."""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import typer

from devices.broker_accounts import (
    SecretTooShort,
    acl_file_text,
    all_accounts,
    credentials_csv_rows,
    password_file_text,
)
from devices.registry_file import RegistryFileError, parse_registry
from launch.output import fail, problems_text


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner alone, replacing it whole (a
    broker reloading meanwhile reads the old file or the new, never half of one)."""
    partial = path.with_name(f".{path.name}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def write_broker_credentials(
    registry_path: Path,
    secret: str,
    *,
    password_file: Path,
    acl_file: Path,
    out_credentials: Path | None,
    hubs: Sequence[str],
    gateways: Sequence[str],
    apis: Sequence[str],
) -> None:
    """Write the files (and the provisioning CSV) and print what they hold; exit 1 on a
    refused registry, 2 on a missing or short secret."""
    try:
        registry = parse_registry(registry_path)
    except RegistryFileError as exc:
        fail(problems_text(registry_path, exc.problems, "nothing written"))
    try:
        accounts = all_accounts(registry, secret, hubs, gateways, apis)
    except SecretTooShort as exc:
        fail(str(exc), 2)
    except ValueError as exc:
        fail(f"{registry_path}: nothing written; {exc}")
    write_private(password_file, password_file_text(accounts))
    write_private(acl_file, acl_file_text(accounts, registry_path.name))
    if out_credentials is not None:
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(("account", "role", "password"))
        writer.writerows(credentials_csv_rows(accounts))
        write_private(out_credentials, table.getvalue())
    roles = Counter(account.role.value for account in accounts)
    typer.echo(
        f"broker accounts: {', '.join(f'{count} {role}' for role, count in sorted(roles.items()))}; "
        f"wrote {password_file} and {acl_file}"
        + (f", passwords in {out_credentials}" if out_credentials is not None else "")
    )
    typer.echo("the broker takes them on SIGHUP (docker-compose kill -s HUP mosquitto)")
