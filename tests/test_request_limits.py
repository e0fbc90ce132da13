"""Request limits (``api/limits.py``, issue 14): text PostgreSQL cannot hold answers 422
naming where it is, and a body past ``SHOUHU_MAX_BODY_BYTES`` answers 413 before any
route or authentication — in process, and against a served ``shouhu api`` whose memory
and ``/healthz`` are measured while 64 MiB bodies arrive."""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest
from fastapi.testclient import TestClient

from api.limits import storable_text
from api.main import create_app
from shouhu.embedded.postgres import free_port
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from tests.escalation_support import DAY, press, q, wristband_in

LIMIT = 1024 * 1024
SHOUHU = shutil.which("shouhu") or str(Path(__file__).resolve().parent.parent / ".venv/bin/shouhu")


@pytest.fixture
def client(county_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=county_url))) as test_client:
        yield test_client


def _operator(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        secret = create_token(
            conn, role=Role.OPERATOR, areas=[], label="值班长", now=datetime.now(UTC), expires_at=None
        )
    return {"Authorization": f"Bearer {secret}"}


# --- text PostgreSQL cannot hold ----------------------------------------------------


def test_a_nul_in_a_query_parameter_is_422_naming_it(client: TestClient, county_url: str) -> None:
    answer = client.get("/api/v1/incidents?state=open%00", headers=_operator(county_url))

    assert answer.status_code == 422
    assert "query parameter 'state'" in answer.json()["detail"]
    assert "NUL" in answer.json()["detail"]


def test_a_nul_in_the_path_is_422(client: TestClient, county_url: str) -> None:
    for path in ("/api/v1/residents/r%001", "/api/v1/devices/%00", "/console/incidents/1%00"):
        answer = client.get(path, headers=_operator(county_url))
        assert answer.status_code == 422, path
        assert answer.json()["detail"].startswith("invalid request: path: a NUL byte"), path


def test_an_ack_whose_note_holds_a_nul_is_422_naming_the_field_and_the_ack_is_not_lost(
    client: TestClient, county_url: str
) -> None:
    device, _grid, _resident = wristband_in(county_url, night_covered=False)
    incident = press(county_url, device, DAY)
    operator = _operator(county_url)

    refused = client.post(f"/api/v1/incidents/{incident}/ack", headers=operator, json={"note": "在\u0000路上"})

    assert refused.status_code == 422, refused.text
    assert "body field 'note'" in refused.json()["detail"]
    assert refused.json()["errors"][0]["loc"] == ["body", "note"]
    assert q(county_url, "SELECT state FROM incidents") == [("open",)]
    # The client is told which field to fix; the corrected ack goes through.
    taken = client.post(f"/api/v1/incidents/{incident}/ack", headers=operator, json={"note": "在路上"})
    assert taken.status_code == 200, taken.text
    assert q(county_url, "SELECT state FROM incidents") == [("acknowledged",)]


def test_a_lone_surrogate_or_a_nul_key_in_json_is_422(client: TestClient, county_url: str) -> None:
    headers = {**_operator(county_url), "Content-Type": "application/json"}
    surrogate = client.post("/api/v1/incidents/1/ack", headers=headers, content=b'{"note": "\\ud800"}')
    key = client.post("/api/v1/incidents/1/resolve", headers=headers, content=b'{"out\\u0000come": "x"}')
    nested = client.post("/api/v1/maintenance", headers=headers, content=b'{"devices": ["a", "b\\u0000"]}')

    assert surrogate.status_code == 422
    assert "body field 'note'" in surrogate.json()["detail"]
    assert "lone surrogate" in surrogate.json()["detail"]
    assert key.status_code == 422
    assert "its name" in key.json()["detail"]
    assert nested.status_code == 422
    assert "body field 'devices.1'" in nested.json()["detail"]


def test_a_nul_in_a_form_body_is_422_naming_the_field(client: TestClient) -> None:
    answer = client.post("/console/login", data={"token": "abc\x00def"})

    assert answer.status_code == 422
    assert "body field 'token'" in answer.json()["detail"]


# --- the body limit, in process ------------------------------------------------------


def test_a_declared_oversize_body_without_a_token_is_413(client: TestClient) -> None:
    answer = client.post(
        "/api/v1/incidents/1/ack",
        content=b"x" * (LIMIT + 1),
        headers={"Content-Type": "application/json"},
    )

    assert answer.status_code == 413
    assert "SHOUHU_MAX_BODY_BYTES" in answer.json()["detail"]


def test_a_chunked_oversize_body_is_413_and_a_body_at_the_limit_is_not(client: TestClient) -> None:
    def chunks(total: int) -> Iterator[bytes]:
        for _ in range(total // 65536):
            yield b" " * 65536

    over = client.post("/api/v1/incidents/1/ack", content=chunks(LIMIT + 65536))
    def padded_json(total: int) -> Iterator[bytes]:
        yield b'{"note": "x"}'
        yield from chunks(total - 65536)
        yield b" " * (65536 - len(b'{"note": "x"}'))

    json_type = {"Content-Type": "application/json"}
    at = client.post("/api/v1/incidents/1/ack", content=padded_json(LIMIT), headers=json_type)

    assert over.status_code == 413
    assert at.status_code == 401  # read whole, then refused for want of a token


# --- the body limit, against a served process -----------------------------------------


@pytest.fixture
def served_api(database_url: str, tmp_path: Path) -> Iterator[tuple[int, int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOUHU_")}
    env |= {"SHOUHU_DATABASE_URL": database_url, "SHOUHU_API_PORT": str(port)}
    process = subprocess.Popen(
        [SHOUHU, "api"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "shouhu api ended"
            assert time.monotonic() < deadline, "shouhu api did not answer /healthz"
            time.sleep(0.2)
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(15)


def _send_huge_body(port: int, size: int, *, chunked: bool, statuses: list[int]) -> None:
    """Send headers and up to ``size`` bytes of body, stopping once the server answers."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    head = (
        f"POST /api/v1/incidents/1/ack HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"{framing}\r\n\r\n"
    ).encode()
    piece = b" " * 65536
    frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        sent = 0
        answer = b""
        try:
            while sent < size:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                sock.sendall(frame)
                sent += len(piece)
            answer = sock.recv(4096)
        except OSError:  # the server closed after answering; the answer may be in flight
            try:
                answer = sock.recv(4096)
            except OSError:
                answer = b""
        if answer.startswith(b"HTTP/1.1 "):
            statuses.append(int(answer[9:12]))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_eight_concurrent_64_mib_bodies_cost_no_memory_and_healthz_stays_fast(
    served_api: tuple[int, int], chunked: bool
) -> None:
    port, pid = served_api
    served = psutil.Process(pid)
    before = served.memory_info().rss
    statuses: list[int] = []
    senders = [
        threading.Thread(
            target=_send_huge_body, args=(port, 64 * 1024 * 1024), kwargs={"chunked": chunked, "statuses": statuses}
        )
        for _ in range(8)
    ]
    for sender in senders:
        sender.start()
    health: list[float] = []
    peak = before
    with httpx.Client(timeout=5) as probe:
        while any(sender.is_alive() for sender in senders) or len(health) < 10:
            start = time.perf_counter()
            assert probe.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            health.append(time.perf_counter() - start)
            peak = max(peak, served.memory_info().rss)
            time.sleep(0.02)
    for sender in senders:
        sender.join(30)

    grown = (peak - before) / 2**20
    print(f"RSS {before / 2**20:.0f} MiB → peak +{grown:.1f} MiB; /healthz max {max(health) * 1000:.0f} ms")
    assert statuses == [413] * 8
    assert grown < 100
    assert max(health) < 0.1


def test_what_the_callbacks_keep_of_text_postgresql_cannot_hold() -> None:
    # The Twilio callbacks skip the 422 (a provider cannot resend); they drop these instead.
    assert storable_text("K7QX\x00 1\x00") == "K7QX 1"
    assert storable_text("a\ud800b") == "ab"
    assert storable_text("好的 1") == "好的 1"
