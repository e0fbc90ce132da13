"""The one import rule per folder (docs/architecture.md, "Layers and packages"),
read from every module's own imports with ``ast``: nothing imports upward, so no
two packages import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What each package may import of the project, besides itself. The floors, bottom up:
# shouhu → devices → alerts → hub → api → launch; simulators stand beside, on shouhu.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "shouhu": frozenset(),
    "devices": frozenset({"shouhu"}),
    "alerts": frozenset({"devices", "shouhu"}),
    "hub": frozenset({"alerts", "devices", "shouhu"}),
    "api": frozenset({"hub", "alerts", "devices", "shouhu"}),
    "gateway": frozenset({"devices", "shouhu"}),
    "simulators": frozenset({"shouhu"}),
    "launch": frozenset({"api", "hub", "alerts", "devices", "gateway", "shouhu", "simulators"}),
}
# Consumers of everything, imported by nothing above: they have no rule here.
OUTSIDE = frozenset({"tests", "bench"})
PROJECT = frozenset(MAY_IMPORT) | OUTSIDE


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, source: str) -> list[tuple[int, str]]:
    """Every module ``source`` imports (line, dotted name), at any depth: inside
    functions and ``TYPE_CHECKING`` blocks too; relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
            elif node.module:
                found.append((node.lineno, node.module))
    return found


def violations(path: Path, source: str) -> list[str]:
    """``file:line imports module`` for each import that breaks its package's rule."""
    package = path.relative_to(ROOT).parts[0]
    allowed = MAY_IMPORT[package] | {package}
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module} ({package}/ may import only {sorted(MAY_IMPORT[package])})"
        for line, module in imported_modules(path, source)
        if module.split(".")[0] in PROJECT and module.split(".")[0] not in allowed
    ]


def _packages() -> list[str]:
    return sorted(
        p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name not in OUTSIDE and p.name != "build"
    )


def test_every_package_has_a_rule() -> None:
    assert set(_packages()) == set(MAY_IMPORT), "give the new package its line in MAY_IMPORT and architecture.md"


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_no_module_imports_above_its_floor(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    broken = [v for path in files for v in violations(path, path.read_text(encoding="utf-8"))]
    assert broken == [], "\n".join(broken)


@pytest.mark.parametrize(
    ("where", "source", "culprit"),
    [
        ("shouhu/x.py", "from hub.service import Hub\n", "hub.service"),
        ("shouhu/x.py", "def f():\n    import launch.cli\n", "launch.cli"),
        (
            "shouhu/x.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from devices import kinds\n",
            "devices",
        ),
        ("devices/x.py", "import alerts.router as r\n", "alerts.router"),
        ("simulators/x.py", "from hub.mqtt import HubConnection\n", "hub.mqtt"),
        ("api/x.py", "from tests.services import Mosquitto\n", "tests.services"),
        ("shouhu/migrations/x.py", "from ...devices import uptime_store\n", "devices"),
    ],
)
def test_an_upward_import_is_named(where: str, source: str, culprit: str) -> None:
    [message] = violations(ROOT / where, source)
    assert message.startswith(f"{where}:")
    assert f"imports {culprit} " in message


def test_imports_within_the_rule_pass() -> None:
    source = "import psycopg\nfrom shouhu.db import Conn\nfrom . import care\nfrom devices.kinds import Channel\n"
    assert violations(ROOT / "alerts" / "x.py", source) == []
