"""The ``shouhu`` command line as a user runs it: real processes, real services."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from shouhu.cli import NOT_LANDED_EXIT
from shouhu.embedded.postgres import free_port
from tests.services import Mosquitto, scratch_dir

SHOUHU = shutil.which("shouhu") or str(Path(__file__).resolve().parent.parent / ".venv/bin/shouhu")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOUHU_")}
    # No stray .env and no recorded embedded database: run from an empty directory.
    env.update(extra)
    return env


def run_shouhu(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SHOUHU, *args], capture_output=True, text=True, env=_env(**env), cwd=cwd, timeout=120)


@pytest.mark.parametrize(
    ("verb", "issue"),
    [
        (["simulate", "wristbands"], "#5"),
        (["simulate", "cameras"], "#5"),
        (["simulate", "emergency-platform"], "#4"),
    ],
)
def test_unlanded_verbs_say_so_and_fail(tmp_path: Path, verb: list[str], issue: str) -> None:
    result = run_shouhu(*verb, cwd=tmp_path)
    assert result.returncode == NOT_LANDED_EXIT
    assert "not available yet" in result.stderr
    assert issue in result.stderr


def test_every_design_verb_is_listed(tmp_path: Path) -> None:
    top = run_shouhu("--help", cwd=tmp_path).stdout
    for verb in ("up", "hub", "router", "api", "migrate", "registry", "token", "simulate"):
        assert re.search(rf"\b{verb}\b", top), verb
    assert "load" in run_shouhu("registry", "--help", cwd=tmp_path).stdout
    assert "create" in run_shouhu("token", "--help", cwd=tmp_path).stdout


def test_bad_configuration_names_the_variable(tmp_path: Path) -> None:
    result = run_shouhu("migrate", cwd=tmp_path, SHOUHU_TIMEZONE="Mars/Olympus")
    assert result.returncode == 2
    assert "SHOUHU_TIMEZONE" in result.stderr


def test_migrate_registry_and_token_against_a_configured_database(database_url: str, tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
    migrate = run_shouhu("migrate", cwd=tmp_path, SHOUHU_DATABASE_URL=database_url)
    assert migrate.returncode == 0, migrate.stderr
    assert "up to date" in migrate.stdout
    load = run_shouhu("registry", "load", str(demo), cwd=tmp_path, SHOUHU_DATABASE_URL=database_url)
    assert load.returncode == 0, load.stderr
    assert "240 residents" in load.stdout
    assert "have hours with no grid worker on duty" in load.stdout  # the night gaps are reported
    again = run_shouhu("registry", "load", str(demo), cwd=tmp_path, SHOUHU_DATABASE_URL=database_url)
    assert "no changes" in again.stdout
    token = run_shouhu(
        "token",
        "create",
        "--role",
        "grid_worker",
        "--area",
        "nowhere",
        cwd=tmp_path,
        SHOUHU_DATABASE_URL=database_url,
    )
    assert token.returncode == 2
    assert "nowhere" in token.stderr


def test_bad_registry_file_loads_nothing_and_says_where(database_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "areas:\n  - {id: county, name: 县, level: county}\n"
        "staff:\n  - {id: s1, name: 李, role: grid_worker, phone: '12345', areas: [county]}\n",
        encoding="utf-8",
    )
    result = run_shouhu("registry", "load", str(bad), cwd=tmp_path, SHOUHU_DATABASE_URL=database_url)
    assert result.returncode == 1
    assert "nothing loaded" in result.stderr
    assert "staff[0] (s1) field 'phone'" in result.stderr


def test_no_database_is_a_clear_error(tmp_path: Path) -> None:
    result = run_shouhu("migrate", cwd=tmp_path, HOME=str(tmp_path), XDG_DATA_HOME=str(tmp_path))
    if os.geteuid() == 0 and Path("/var/lib/shouhu/embedded.json").exists():
        pytest.fail("a recorded embedded database from a real `shouhu up` is in the way")
    assert result.returncode == 2
    assert "SHOUHU_DATABASE_URL" in result.stderr


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def running_up(mosquitto: Mosquitto) -> Iterator[tuple[subprocess.Popen[str], int, list[str]]]:
    port = free_port()
    data_dir = scratch_dir("shouhu-up-cli-")
    process = subprocess.Popen(
        [SHOUHU, "up", "--demo", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=data_dir,
        env=_env(SHOUHU_MQTT_URL=mosquitto.url, SHOUHU_API_PORT=str(port)),
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            status, _ = _get(f"http://127.0.0.1:{port}/readyz") if _port_open(port) else (0, b"")
            if status == 200:
                break
            assert process.poll() is None, "shouhu up exited early"
            time.sleep(0.2)
        else:
            pytest.fail("shouhu up did not become ready in 90 s")
        yield process, port, lines
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=30)
            lines.extend(out.splitlines())
        shutil.rmtree(data_dir, ignore_errors=True)


def _port_open(port: int) -> bool:
    from shouhu.embedded.broker import is_listening

    return is_listening("127.0.0.1", port)


def test_up_demo_serves_the_demo_county(
    running_up: tuple[subprocess.Popen[str], int, list[str]], tmp_path: Path
) -> None:
    process, port, _lines = running_up
    assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    status, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert b"# TYPE" in body
    # `shouhu token create` in another terminal finds the embedded database on its own.
    data_dir = Path(str(process.args[4]))  # type: ignore[index]
    recorded = json.loads((data_dir / "embedded.json").read_text())
    token = run_shouhu(
        "token",
        "create",
        "--role",
        "operator",
        cwd=tmp_path,
        SHOUHU_DATABASE_URL=recorded["database_url"],
    )
    assert token.returncode == 0, token.stderr
    status, body = _get(f"http://127.0.0.1:{port}/api/v1/areas?limit=500", token.stdout.strip())
    assert status == 200, body
    assert json.loads(body)["count"] >= 1 + 3 + 10 + 30
    assert _get(f"http://127.0.0.1:{port}/api/v1/areas")[0] == 401


def test_up_prints_where_the_data_is(
    running_up: tuple[subprocess.Popen[str], int, list[str]],
) -> None:
    process, _port, lines = running_up
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=30)
    lines.extend(out.splitlines())
    text = "\n".join(lines)
    data_dir = str(process.args[4])  # type: ignore[index]
    assert f"data kept under {data_dir}" in text
    assert "registry loaded" in text
    assert "240 residents" in text
    # The demo press reached a simulated phone: the terminal shows it ringing.
    demo_line = next(line for line in lines if line.startswith("demo: ") and "presses SOS" in line)
    on_duty = re.findall(r"\+1\d{10}", demo_line.split("on duty:")[1])
    assert on_duty
    assert any(f"ringing {on_duty[0]}" in line for line in lines), text
