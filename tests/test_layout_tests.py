"""The suite's own layout: helpers live in ``tests/support/``, and no test module or
benchmark imports a test module (``tests/test_*.py``) or ``tests/conftest.py``. A helper imported from a test
module drags that module's fixtures and collection along, and couples two tests that
should not know about each other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("tests", "bench")


def _is_test_module(dotted: str) -> bool:
    return any(part.startswith("test_") or part == "conftest" for part in dotted.split("."))


def imported_test_modules(source: str, path: Path) -> list[str]:
    """The test modules ``source`` (the text of ``path``) imports, as written."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            if _is_test_module(module):
                found.append(module)
            else:  # `from tests import test_hub`, `from . import test_hub`
                prefix = module if module.endswith(".") else module + "."
                found += [prefix + alias.name for alias in node.names if _is_test_module(alias.name)]
    return found


def test_the_check_sees_every_way_of_importing_a_test_module() -> None:
    source = "\n".join(
        [
            "import tests.test_hub",
            "from tests.test_hub import wait_until",
            "from tests import test_consoles",
            "from .test_callbacks import Stack",
            "from . import test_text",
            "from tests.conftest import fresh_database",
            "from tests.support.hub import wait_until",
            "import pytest",
        ]
    )
    assert imported_test_modules(source, Path("example.py")) == [
        "tests.test_hub",
        "tests.test_hub",
        "tests.test_consoles",
        ".test_callbacks",
        ".test_text",
        "tests.conftest",
    ]


def test_no_test_or_benchmark_imports_a_test_module() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for folder in CHECKED
        for path in sorted((ROOT / folder).rglob("*.py"))
        for module in imported_test_modules(path.read_text(encoding="utf-8"), path)
    ]
    assert offenders == [], "move the helper into tests/support/:\n" + "\n".join(offenders)
