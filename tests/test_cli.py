"""The ``shouhu`` command line as a user runs it: real processes, real services."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import psutil
import psycopg
import pytest

from launch.cli import DEMO_ACCOUNT_SID, DEMO_AUTH_TOKEN, DEMO_FROM
from shouhu import __version__
from shouhu.embedded.postgres import free_port
from tests.support.services import Mosquitto, press_and_wait_for_ring, scratch_dir, wristband_with_grid_worker_on_duty

SHOUHU = shutil.which("shouhu") or str(Path(__file__).resolve().parent.parent / ".venv/bin/shouhu")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOUHU_")}
    # No stray .env and no recorded embedded database: run from an empty directory.
    env.update(extra)
    return env


def run_shouhu(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SHOUHU, *args], capture_output=True, text=True, env=_env(**env), cwd=cwd, timeout=120)


def test_a_fleet_verb_without_what_to_run_says_what_to_give(tmp_path: Path) -> None:
    result = run_shouhu("simulate", "wristbands", cwd=tmp_path)
    assert result.returncode == 2
    assert "--press" in result.stderr
    assert "--fleet" in result.stderr
    both = run_shouhu("simulate", "wristbands", "--fleet", "--press", "wb-0001", cwd=tmp_path)
    assert both.returncode == 2
    assert "--fleet" in both.stderr
    no_broker = run_shouhu("simulate", "cameras", cwd=tmp_path, SHOUHU_MQTT_URL=f"mqtt://127.0.0.1:{free_port()}")
    assert no_broker.returncode == 2
    assert "cannot reach the MQTT broker" in no_broker.stderr
    assert "Traceback" not in no_broker.stderr
    missing = run_shouhu("simulate", "cameras", "--registry", str(tmp_path / "nowhere.yaml"), cwd=tmp_path)
    assert missing.returncode == 2
    assert "--registry" in missing.stderr
    assert "nowhere.yaml" in missing.stderr


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
    nowhere = f"mqtt://127.0.0.1:{free_port()}"  # no broker: the watches' numbers cannot go
    load = run_shouhu(
        "registry", "load", str(demo), cwd=tmp_path, SHOUHU_DATABASE_URL=database_url, SHOUHU_MQTT_URL=nowhere
    )
    assert load.returncode == 0, load.stderr
    assert "240 residents" in load.stdout
    assert "have hours with no grid worker on duty" in load.stdout  # the night gaps are reported
    assert "watches' SOS numbers not sent: the broker is unavailable" in load.stdout
    again = run_shouhu(
        "registry", "load", "--no-push-sos-numbers", str(demo), cwd=tmp_path, SHOUHU_DATABASE_URL=database_url
    )
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


def test_a_control_character_in_a_name_is_refused_by_registry_load_and_loads_nothing(
    database_url: str, tmp_path: Path
) -> None:
    bad = tmp_path / "excel.yaml"
    # "\\v" is YAML's escape for \x0b, the line break Excel writes inside a cell.
    bad.write_text(
        "areas:\n  - {id: county, name: 县, level: county}\n"
        "  - {id: g1, name: 一网格, level: grid, parent: county}\n"
        'residents:\n  - {id: r1, name: "王\\v奶奶", grid: g1, address: "东关村\\a1号"}\n',
        encoding="utf-8",
    )
    result = run_shouhu("registry", "load", str(bad), cwd=tmp_path, SHOUHU_DATABASE_URL=database_url)
    assert result.returncode == 1
    assert "nothing loaded" in result.stderr
    assert "residents[0] (r1) field 'name': control character '\\x0b' is not allowed" in result.stderr
    assert "residents[0] (r1) field 'address': control character '\\x07' is not allowed" in result.stderr
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM areas").fetchone() == (0,)


def test_no_database_is_a_clear_error(tmp_path: Path) -> None:
    # SHOUHU_DATA_DIR keeps the machine's own data directory (/var/lib/shouhu as root,
    # where a real `shouhu up` may have recorded a running database) out of the test.
    result = run_shouhu("migrate", cwd=tmp_path, SHOUHU_DATA_DIR=str(tmp_path / "data"))
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
    except OSError:  # nothing listening yet
        return 0, b""


@dataclass
class RunningUp:
    process: subprocess.Popen[str]
    api_port: int
    data_dir: Path
    lines: list[str]

    def wait_for_line(self, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if needle in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no line with {needle!r} in:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(30)


def _read_lines(stream: IO[str], lines: list[str]) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))


@contextmanager
def _running_up(mosquitto: Mosquitto, *options: str, prefix: str, port_option: bool = False) -> Iterator[RunningUp]:
    """`shouhu up OPTIONS` on the embedded database, with the session's Mosquitto, once ready.

    The API's port is chosen here, given as SHOUHU_API_PORT or, with ``port_option``, as ``--port``.
    """
    port = free_port()
    data_dir = scratch_dir(f"shouhu-{prefix}-")
    port_args = ["--port", str(port)] if port_option else []
    env = _env(
        SHOUHU_MQTT_URL=mosquitto.url,
        SHOUHU_HUB_ID=f"{prefix}-{port}",
        SHOUHU_WATCH_PORT=str(free_port()),
        SHOUHU_WATCH_GATEWAY_ID=f"{prefix}-watch-{port}",
    )
    if not port_option:
        env["SHOUHU_API_PORT"] = str(port)
    process = subprocess.Popen(
        [SHOUHU, "up", *options, *port_args, "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=data_dir,
        env=env,
    )
    assert process.stdout is not None
    running = RunningUp(process, port, data_dir, [])
    threading.Thread(target=_read_lines, args=(process.stdout, running.lines), daemon=True).start()
    try:
        deadline = time.monotonic() + 90
        while _get(f"http://127.0.0.1:{port}/readyz")[0] != 200:
            assert process.poll() is None, "shouhu up exited early:\n" + "\n".join(running.lines)
            assert time.monotonic() < deadline, "shouhu up not ready in 90 s"
            time.sleep(0.2)
        yield running
    finally:
        running.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def running_up(mosquitto: Mosquitto) -> Iterator[RunningUp]:
    """`shouhu up --demo` on the embedded database, with the session's Mosquitto."""
    with _running_up(mosquitto, "--demo", prefix="up") as running:
        yield running


def test_up_demo_serves_the_demo_county(running_up: RunningUp, tmp_path: Path) -> None:
    port = running_up.api_port
    assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    status, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    assert b"shouhu_sos_press_to_first_request_seconds" in body
    # `shouhu token create` in another terminal reaches the embedded database through
    # the URL recorded in the data directory (SHOUHU_DATA_DIR, as --data-dir for `up`).
    assert json.loads((running_up.data_dir / "embedded.json").read_text())["database_url"]
    token = run_shouhu("token", "create", "--role", "operator", cwd=tmp_path, SHOUHU_DATA_DIR=str(running_up.data_dir))
    assert token.returncode == 0, token.stderr
    status, body = _get(f"http://127.0.0.1:{port}/api/v1/areas?limit=500", token.stdout.strip())
    assert status == 200, body
    assert json.loads(body)["count"] >= 1 + 3 + 10 + 30
    assert _get(f"http://127.0.0.1:{port}/api/v1/areas")[0] == 401
    # The consoles come up with it, their page and assets served by the same process.
    status, body = _get(f"http://127.0.0.1:{port}/console/login")
    assert status == 200
    assert "访问令牌".encode() in body
    assert _get(f"http://127.0.0.1:{port}/console/static/console.js")[0] == 200
    assert running_up.wait_for_line("consoles: http://127.0.0.1:")


def test_up_demo_shows_the_grid_workers_phone_ringing(running_up: RunningUp) -> None:
    running_up.wait_for_line("registry loaded")
    assert any(f"data kept under {running_up.data_dir}" in line for line in running_up.lines)
    demo_line = running_up.wait_for_line("presses SOS")
    on_duty = re.findall(r"\+1\d{10}", demo_line.split("on duty:")[1])
    assert on_duty
    running_up.wait_for_line(f"ringing {on_duty[0]}")


def test_mosquitto_pub_on_a_fresh_up_rings_within_a_second(running_up: RunningUp, mosquitto: Mosquitto) -> None:
    phone = re.search(r"http://127\.0\.0\.1:\d+", running_up.wait_for_line("phone network: simulated"))
    assert phone is not None
    demo_device = re.search(r"wristband (\S+) ", running_up.wait_for_line("presses SOS"))
    assert demo_device is not None
    running_up.wait_for_line("ringing ")  # the demo's own press has rung: the next call is ours
    database_url = running_up.wait_for_line("database: postgresql://").split("database: ")[1]
    device_id, expected = wristband_with_grid_worker_on_duty(database_url, exclude={demo_device.group(1)})
    ring = press_and_wait_for_ring(mosquitto.port, device_id, phone.group(0))
    assert ring.call["to"] in expected
    assert ring.seconds < 1.0, f"first ring after {ring.seconds:.3f}s"
    # The phone network refuses (503) from now on: the next press is paged through the
    # demo's secondary provider, the simulated Aliyun, within 10 s (issue 17).
    aliyun = re.search(r"http://127\.0\.0\.1:\d+", running_up.wait_for_line("aliyun: simulated"))
    assert aliyun is not None
    httpx.post(f"{phone.group(0)}/_sim/faults", json={"to": "*", "fail": "unavailable"}).raise_for_status()
    other, others_phones = wristband_with_grid_worker_on_duty(database_url, exclude={demo_device.group(1), device_id})
    with pytest.raises(AssertionError, match="no call reached the phone network"):
        press_and_wait_for_ring(mosquitto.port, other, phone.group(0), timeout=10.0)
    calls = [r for r in httpx.get(f"{aliyun.group(0)}/_sim/requests").json() if r["action"] == "IvrCall"]
    assert any(r["to"] in others_phones and r["provider_id"] for r in calls), calls


def test_up_demo_runs_the_watch_gateway_beside_the_hub(running_up: RunningUp, tmp_path: Path) -> None:
    """A simulated 4G watch of the demo county is answered by `up`'s gateway: its alarm
    went through the broker to the hub and was stored (the answer waits for the receipt)."""
    line = running_up.wait_for_line("watch gateway: ")
    assert "(10 watches registered)" in line
    port = re.search(r"127\.0\.0\.1:(\d+)", line)
    assert port is not None
    result = run_shouhu(
        "simulate", "watch", "--press", "8600000063", "--gateway", f"127.0.0.1:{port.group(1)}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8600000063: SOS press answered (AL)" in result.stdout


def test_demo_refuses_a_real_phone_network(tmp_path: Path) -> None:
    result = run_shouhu(
        "up",
        "--demo",
        "--data-dir",
        str(tmp_path / "data"),
        cwd=tmp_path,
        SHOUHU_TWILIO_API_BASE="https://api.example.com",
    )
    assert result.returncode == 2
    assert "refuses SHOUHU_TWILIO_API_BASE=https://api.example.com" in result.stderr
    assert not (tmp_path / "data").exists()  # refused before anything started


def test_up_demo_takes_an_sms_reply_through_the_signed_callback(running_up: RunningUp) -> None:
    phone = re.search(r"http://127\.0\.0\.1:\d+", running_up.wait_for_line("phone network: simulated"))
    assert phone is not None
    sms = running_up.wait_for_line("SMS to ")
    to = re.search(r"SMS to (\+1\d{10})", sms)
    code = re.search(r"回复 ([A-Z0-9]{5}) 1", sms)
    assert to is not None
    assert code is not None
    reply = httpx.post(f"{phone.group(0)}/_sim/inbound-sms", json={"from": to.group(1), "body": f"{code.group(1)} 1"})
    assert reply.status_code == 200, reply.text
    assert "接单" in reply.json()["reply"]
    database_url = running_up.wait_for_line("database: postgresql://").split("database: ")[1]
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT state, acknowledged_via FROM incidents WHERE code = %s", (code.group(1),)).fetchone()
    assert row == ("acknowledged", "sms")


# --- failures that say what to do (issue 14) ------------------------------------------


def test_version_and_help_without_type_columns(tmp_path: Path) -> None:
    version = run_shouhu("--version", cwd=tmp_path)
    assert version.returncode == 0
    assert version.stdout.strip() == f"shouhu {__version__}"
    for verb in ([], ["up"], ["hub"], ["router"], ["api"], ["simulate", "wristbands"], ["token", "create"]):
        text = run_shouhu(*verb, "--help", cwd=tmp_path).stdout
        assert "<bool>" not in text, verb
    assert "--port" in run_shouhu("up", "--help", cwd=tmp_path).stdout


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other process listens on, on every address."""
    with socket.create_server(("0.0.0.0", 0)) as holder:
        yield holder.getsockname()[1]


@pytest.mark.parametrize(
    ("verb", "setting", "extra"),
    [
        (["api"], "SHOUHU_API_PORT", {}),
        (["hub"], "SHOUHU_METRICS_PORT", {"SHOUHU_HUB_ID": "taken-port-hub"}),
        (
            ["router"],
            "SHOUHU_METRICS_PORT",
            {"SHOUHU_TWILIO_ACCOUNT_SID": "AC1", "SHOUHU_TWILIO_AUTH_TOKEN": "t", "SHOUHU_TWILIO_FROM": "+12025550100"},
        ),
        (["up", "--data-dir", "data"], "SHOUHU_API_PORT", {}),
        (["gateway", "watch"], "SHOUHU_WATCH_PORT", {}),
        (["up", "--data-dir", "data"], "SHOUHU_WATCH_PORT", {"SHOUHU_API_PORT": "free"}),
        (["gateway", "watch"], "SHOUHU_METRICS_PORT", {"SHOUHU_WATCH_PORT": "free"}),
    ],
)
def test_a_port_in_use_is_one_line_naming_the_port_and_the_setting(
    taken_port: int, tmp_path: Path, verb: list[str], setting: str, extra: dict[str, str]
) -> None:
    extra = {name: str(free_port()) if value == "free" else value for name, value in extra.items()}
    result = run_shouhu(
        *verb,
        cwd=tmp_path,
        SHOUHU_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",
        SHOUHU_MQTT_URL="mqtt://127.0.0.1:1",
        SHOUHU_SPOOL_DIR=str(tmp_path / "spool"),
        **{setting: str(taken_port)},
        **extra,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"port {taken_port} is already in use" in result.stderr
    assert setting in result.stderr
    assert "Traceback" not in result.stderr
    if verb[0] == "up":
        assert not (tmp_path / "data").exists()  # refused before anything started


def test_up_without_a_phone_provider_runs_says_so_and_binds_what_it_prints(mosquitto: Mosquitto) -> None:
    with _running_up(mosquitto, prefix="up-nophone", port_option=True) as running:
        port = running.api_port
        warning = running.wait_for_line("NO PHONE PROVIDER")
        assert "no SMS and no voice call will go out" in warning
        how = running.wait_for_line("SHOUHU_TWILIO_ACCOUNT_SID")
        assert "SHOUHU_TWILIO_AUTH_TOKEN" in how
        assert "SHOUHU_TWILIO_FROM" in how
        assert "--demo" in how
        running.wait_for_line(f"API: http://127.0.0.1:{port} ")
        listening = [
            c.laddr
            for c in psutil.Process(running.process.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert [address.ip for address in listening] == ["127.0.0.1"]
        assert not any("RuntimeDirWarning" in line for line in running.lines)


def test_up_with_a_simulated_phone_network_pages_through_it(mosquitto: Mosquitto) -> None:
    with _running_up(mosquitto, "--phone-network", "simulate", prefix="up-simphone") as running:
        line = running.wait_for_line("phone network: simulated")
        base = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert base is not None
        database_url = running.wait_for_line("database: postgresql://").split("database: ")[1]
        demo = Path(__file__).resolve().parent.parent / "simulators" / "demo_county.yaml"
        load = run_shouhu("registry", "load", str(demo), cwd=running.data_dir, SHOUHU_DATABASE_URL=database_url)
        assert load.returncode == 0, load.stderr
        device_id, expected = wristband_with_grid_worker_on_duty(database_url, exclude=set())
        ring = press_and_wait_for_ring(mosquitto.port, device_id, base.group(0))
        assert ring.call["to"] in expected
        assert not any("NO PHONE PROVIDER" in line for line in running.lines)


def test_up_demo_keeps_simulator_access_logs_and_runtime_dir_warnings_out(running_up: RunningUp) -> None:
    running_up.wait_for_line("ringing ")
    running_up.wait_for_line("SMS to ")
    assert not any("/2010-04-01/" in line for line in running_up.lines), "\n".join(running_up.lines)
    assert not any("RuntimeDirWarning" in line for line in running_up.lines)


def test_the_phone_network_simulator_prints_the_credentials_it_accepts(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [SHOUHU, "simulate", "phone-network", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
        env=_env(),
    )
    assert process.stdout is not None
    try:
        banner = [process.stdout.readline() for _ in range(5)]
    finally:
        process.terminate()
        process.wait(15)
    text = "".join(banner)

    assert f"SHOUHU_TWILIO_API_BASE=http://127.0.0.1:{port}" in text
    assert f"SHOUHU_TWILIO_ACCOUNT_SID={DEMO_ACCOUNT_SID}" in text
    assert f"SHOUHU_TWILIO_AUTH_TOKEN={DEMO_AUTH_TOKEN}" in text
    assert f"SHOUHU_TWILIO_FROM={DEMO_FROM}" in text
