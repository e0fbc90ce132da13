"""docs/contract.md against the code, so the contract cannot drift from what is built.

Each check goes both ways — what the code has that the page does not name, and what the
page names that the code does not have — and its failure says which is which: every
``SHOUHU_*`` setting (with its default), every HTTP route, every command and its flags,
every MQTT topic and subscription, every payload field and every dead-letter reason.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import typer.main
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from typer.core import TyperGroup, TyperOption

from api.main import create_app
from devices.commands import command_topic, result_topic
from devices.contract import CHANNELS_OF_KIND, PAYLOAD_MODELS, TOPIC_PREFIX, RejectReason
from hub.mqtt import ALARM_SUBSCRIPTIONS, bulk_subscriptions, probe_topic, receipt_topic, share_probe_topic
from hub.service import SHARE_PROBE_GROUP
from launch.cli import app as shouhu_app
from shouhu.settings import Settings, setting_env_names

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "docs" / "contract.md"
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


@cache
def contract() -> str:
    return CONTRACT.read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text under the heading ``title`` up to the next heading of the same or a higher level."""
    lines = contract().splitlines()
    for start, line in enumerate(lines):
        match = re.fullmatch(r"(#+) (.*)", line)
        if match and match.group(2) == title:
            level = len(match.group(1))
            end = next(
                (
                    i
                    for i in range(start + 1, len(lines))
                    if (m := re.match(r"(#+) ", lines[i])) and len(m.group(1)) <= level
                ),
                len(lines),
            )
            return "\n".join(lines[start + 1 : end])
    raise AssertionError(f"docs/contract.md has no heading {title!r}")


def table_rows(text: str) -> Iterator[list[str]]:
    """The cells of each table row in ``text`` (header rows included, separator rows not)."""
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line):
            # A `\|` inside a cell is a literal bar, not a cell boundary.
            yield [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]


def code_span(cell: str) -> str | None:
    """The cell's first `code` span, or None."""
    match = re.search(r"`([^`]+)`", cell)
    return match.group(1) if match else None


def assert_same(what: str, in_code: Iterable[str], in_doc: Iterable[str], code_where: str) -> None:
    code, doc = set(in_code), set(in_doc)
    problems = []
    if code - doc:
        problems.append(f"{what} in the code ({code_where}) but not in docs/contract.md: {sorted(code - doc)}")
    if doc - code:
        problems.append(f"{what} in docs/contract.md but not in the code ({code_where}): {sorted(doc - code)}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- settings


def test_every_setting_is_named_and_no_other() -> None:
    code = set(setting_env_names())
    named = re.findall(r"\bSHOUHU_[A-Z0-9_]*\*?", contract())
    exact = {name for name in named if not name.endswith("*")}
    assert_same("settings", code, exact, "shouhu/settings.py")
    families = {name.removesuffix("*") for name in named if name.endswith("*")}
    unmatched = sorted(f"{family}*" for family in families if not any(n.startswith(family) for n in code))
    assert not unmatched, f"families in docs/contract.md that match no setting (shouhu/settings.py): {unmatched}"


def test_every_setting_has_its_row_with_its_default() -> None:
    rows = {
        name: cells
        for cells in table_rows(section("Settings"))
        if (name := code_span(cells[0])) and name.startswith("SHOUHU_")
    }
    assert_same("rows of the Settings table", setting_env_names(), rows, "shouhu/settings.py")
    for name, cells in rows.items():
        assert len(cells) == 4, f"{name}: the row is not name | type | default | meaning: {cells}"
        field = Settings.model_fields[name.removeprefix("SHOUHU_").lower()]
        if field.default_factory is not None:
            continue  # computed at start (the host name): the row says how
        default = field.default
        shown = "empty" if default == "" else str(default).lower() if isinstance(default, bool) else str(default)
        assert shown in cells[2], f"{name}: the default is {default!r} in shouhu/settings.py, the doc says {cells[2]!r}"


# ----------------------------------------------------------------------------- routes


def api_app() -> FastAPI:
    """The API, never served: nothing connects. ``create_app`` takes a database URL, or
    (issue 14) the settings; whichever this tree has."""
    url = "postgresql://contract-doc.invalid/none"
    first = next(iter(inspect.signature(create_app).parameters))
    argument: Any = Settings(database_url=url) if first == "settings" else url
    return create_app(argument)


def app_routes() -> set[str]:
    """Every ``METHOD /path`` the API serves (HEAD, which Starlette adds to GET, left out)."""
    app = api_app()
    routes = set()
    for context in iter_route_contexts(app.routes):
        methods = getattr(context.original_route, "methods", None) or set()
        routes |= {f"{method} {context.path}" for method in methods if method != "HEAD"}
    return routes


ROUTE = re.compile(rf"`({'|'.join(HTTP_METHODS)}) (/[^`\s?]*)")


def test_every_route_is_named_and_no_other() -> None:
    named = {f"{method} {path}" for method, path in ROUTE.findall(contract())}
    assert_same("routes", app_routes(), named, "api.main.create_app")


def test_every_route_has_its_row() -> None:
    rows = set()
    for title in ("Routes", "Consoles"):
        for cells in table_rows(section(title)):
            match = ROUTE.match(cells[0])
            if match:
                assert len(cells) >= 3, f"{cells[0]}: the row does not say who may call it and what it returns"
                rows.add(f"{match.group(1)} {match.group(2)}")
    assert_same("rows of the Routes and Consoles tables", app_routes(), rows, "api.main.create_app")


# ---------------------------------------------------------------------------- commands


def cli_command() -> Any:
    """The ``shouhu`` command tree."""
    return typer.main.get_command(shouhu_app)


def cli_commands() -> dict[str, set[str]]:
    """Each command a user runs (``shouhu`` itself and every leaf verb), with its long flags."""
    found: dict[str, set[str]] = {}

    def walk(command: Any, path: str) -> None:
        flags = {
            flag
            for param in command.params
            if isinstance(param, TyperOption)
            for flag in (*param.opts, *param.secondary_opts)
            if flag.startswith("--")
        }
        if isinstance(command, TyperGroup) and command.commands:
            if flags:
                found[path] = flags
            for name, sub in command.commands.items():
                walk(sub, f"{path} {name}")
        else:
            found[path] = flags

    walk(cli_command(), "shouhu")
    found.setdefault("shouhu", set())
    return found


def documented_commands() -> dict[str, set[str]]:
    """The Command line table: ``shouhu VERB …`` (arguments in capitals dropped) → its flags."""
    documented: dict[str, set[str]] = {}
    for cells in table_rows(section("Command line")):
        span = code_span(cells[0])
        if span is None or not span.startswith("shouhu"):
            continue
        words = []
        for word in span.split():
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                break
            words.append(word)
        assert len(cells) == 3, f"{span}: the row is not command | flags | does: {cells}"
        documented[" ".join(words)] = set(re.findall(r"--[a-z][a-z-]*", cells[1]))
    return documented


def test_every_command_and_flag_is_named_and_no_other() -> None:
    code, doc = cli_commands(), documented_commands()
    assert_same("commands (rows of the Command line table)", code, doc, "the typer app")
    for command, flags in code.items():
        assert_same(f"flags of `{command}`", flags, doc[command], "the typer app")


# ------------------------------------------------------------------------------- MQTT


def device_topics() -> set[str]:
    topics = {
        f"{TOPIC_PREFIX}/{kind}/{{id}}/{channel}" for kind, channels in CHANNELS_OF_KIND.items() for channel in channels
    }
    return topics | {receipt_topic("{id}"), command_topic("{id}"), result_topic("{id}")}


def test_every_topic_is_named_and_no_other() -> None:
    named = set(re.findall(r"`(shouhu/v1/[a-z_]+/\{id\}/[a-z_]+)`", contract()))
    assert_same("device topics", device_topics(), named, "devices/contract.py, hub/mqtt.py")


def test_every_subscription_and_probe_topic_is_named() -> None:
    hub_topics = {
        *ALARM_SUBSCRIPTIONS,
        *bulk_subscriptions(shared=True),
        *bulk_subscriptions(shared=False),
        probe_topic("{hub_id}"),
        f"$share/{SHARE_PROBE_GROUP}/{share_probe_topic('{hub_id}')}",
    }
    missing = sorted(topic for topic in hub_topics if f"`{topic}`" not in contract())
    assert not missing, f"hub topics in the code (hub/mqtt.py, hub/service.py) but not in docs/contract.md: {missing}"


def test_every_payload_field_is_named_and_no_other() -> None:
    rows = {}
    for cells in table_rows(section("Payloads")):
        channel, field = code_span(cells[0]), code_span(cells[1]) if len(cells) > 1 else None
        if channel and field:
            assert len(cells) == 5, f"{channel}.{field}: the row is not channel | field | type | range | required"
            rows[f"{channel}.{field}"] = cells[4]
    code = {
        f"{channel}.{name}": field.is_required()
        for channel, model in PAYLOAD_MODELS.items()
        for name, field in model.model_fields.items()
    }
    assert_same("payload fields", code, rows, "devices/contract.py")
    for key, required in code.items():
        expected = "required" if required else "optional"
        assert rows[key] == expected, f"{key} is {expected} in devices/contract.py, the doc says {rows[key]!r}"


def test_every_dead_letter_reason_is_named_and_no_other() -> None:
    named = {span for cells in table_rows(section("Bad input")) if (span := code_span(cells[0]))}
    assert_same("dead-letter reasons", (reason.value for reason in RejectReason), named, "devices/contract.py")


# ------------------------------------------------------------------------------ links


def test_the_docs_link_the_contract_and_not_the_design_brief() -> None:
    linking = {
        "README.md": "docs/contract.md",
        "docs/architecture.md": "contract.md",
        "docs/escalation.md": "contract.md",
    }
    for name, target in linking.items():
        text = (ROOT / name).read_text(encoding="utf-8")
        assert f"]({target})" in text, f"{name} does not link {target}"
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        links = re.findall(r"\]\(([^)]*DESIGN\.md[^)]*)\)", path.read_text(encoding="utf-8"))
        assert not links, f"{path.relative_to(ROOT)} links DESIGN.md, which is not in the repository: {links}"
