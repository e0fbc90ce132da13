"""The provider transport's kept-alive connections (alerts/notifiers/keepalive.py), against
real sockets: reuse, a connection the server closed while idle, a server that hangs or
breaks off its answer, and sender threads side by side."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import certifi
import pytest
import requests

from alerts.notifiers.keepalive import IDLE_REUSE_S, KeepAliveTransport
from alerts.notifiers.twilio import RebasingHttpClient
from tests.support.local_http import serve_in_thread
from tests.support.tls import make_pki

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class EchoServer:
    """An HTTP/1.1 server answering each POST with its body; it counts connections and
    requests, and with ``close_after_answer`` closes every connection once it has
    answered, without saying so (a keep-alive timeout that fires while the client idles)."""

    def __init__(self, *, close_after_answer: bool = False) -> None:
        self.connections = 0
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()
        self.hung_up = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are written apart

            def setup(self) -> None:
                super().setup()
                with owner.lock:
                    owner.connections += 1

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with owner.lock:
                    owner.bodies.append(body)
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                if close_after_answer:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    owner.hung_up.set()

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server, self.url = serve_in_thread(Handler)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def read_request(conn: socket.socket) -> bytes:
    """One whole request off a raw connection (headers and body come in separate writes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data  # the client went away mid-request
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@pytest.fixture
def transport() -> Iterator[KeepAliveTransport]:
    kept = KeepAliveTransport(ca_bundle=certifi.where())
    yield kept
    kept.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def test_one_thread_keeps_one_connection_for_its_requests(echo: EchoServer, transport: KeepAliveTransport) -> None:
    answers = [transport.request("POST", echo.url + "/x", body=b"n=%d" % n, headers=FORM, timeout=5) for n in range(20)]
    assert [a.body for a in answers] == [b"n=%d" % n for n in range(20)]
    assert {a.status for a in answers} == {201}
    assert answers[0].headers["content-type"] == "application/json"  # looked up case-insensitively
    assert echo.connections == 1


def test_a_connection_the_server_closed_while_idle_is_replaced_before_the_request_is_written(
    transport: KeepAliveTransport,
) -> None:
    """Had the request been written to the closed socket, it would fail (or, worse, leave
    the caller guessing whether the provider got it); it goes out once, on a new one."""
    server = EchoServer(close_after_answer=True)
    try:
        first = transport.request("POST", server.url + "/x", body=b"first", headers=FORM, timeout=5)
        assert server.hung_up.wait(5)  # its FIN is on the client's idle socket (loopback)
        second = transport.request("POST", server.url + "/x", body=b"second", headers=FORM, timeout=5)
    finally:
        server.close()
    assert (first.body, second.body) == (b"first", b"second")
    assert server.bodies == [b"first", b"second"]
    assert server.connections == 2


def test_sender_threads_each_get_their_own_answers(echo: EchoServer, transport: KeepAliveTransport) -> None:
    mixed: list[tuple[bytes, bytes]] = []

    def sender(name: int) -> None:
        for n in range(30):
            body = b"thread=%d&n=%d" % (name, n)
            answer = transport.request("POST", echo.url + "/x", body=body, headers=FORM, timeout=5)
            if answer.body != body:
                mixed.append((body, answer.body))
        transport.close()  # this thread's connection

    threads = [threading.Thread(target=sender, args=(name,)) for name in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert mixed == []
    assert len(echo.bodies) == 6 * 30
    assert echo.connections == 6  # one per thread, kept


def test_a_server_that_never_answers_is_a_timeout_and_the_request_is_not_sent_again() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received: list[bytes] = []
    got_one = threading.Event()

    def swallow() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            received.append(read_request(conn))  # read the request, answer nothing, keep it open
            got_one.set()

    threading.Thread(target=swallow, daemon=True).start()
    client = RebasingHttpClient(f"http://127.0.0.1:{port}", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(requests.Timeout):
        client.request("POST", "https://api.twilio.com/2010-04-01/Accounts/AC1/Calls.json", data={"To": "+1"})
    assert time.monotonic() - started < 3
    assert got_one.wait(5)
    listener.close()
    assert len(received) == 1
    assert received[0].endswith(b"To=%2B1")


def test_an_answer_broken_off_is_a_connection_error_and_the_next_request_opens_a_new_connection() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[bytes] = []

    def break_off_then_answer() -> None:
        conn, _ = listener.accept()
        accepted.append(read_request(conn))
        conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n{\"sid\":")  # 100 promised, 7 sent
        conn.close()
        conn, _ = listener.accept()
        accepted.append(read_request(conn))
        conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}")
        conn.close()

    server = threading.Thread(target=break_off_then_answer, daemon=True)
    server.start()
    client = RebasingHttpClient(f"http://127.0.0.1:{port}", timeout=5)
    url = "https://api.twilio.com/2010-04-01/Accounts/AC1/Calls.json"
    with pytest.raises(requests.ConnectionError):
        client.request("POST", url, data={"To": "+1"})
    assert client.request("POST", url, data={"To": "+2"}).status_code == 201
    server.join(5)
    listener.close()
    assert [request.split(b"\r\n\r\n")[-1] for request in accepted] == [b"To=%2B1", b"To=%2B2"]


def test_a_refused_connection_is_a_connection_error() -> None:
    unused = socket.create_server(("127.0.0.1", 0))
    port = unused.getsockname()[1]
    unused.close()
    with pytest.raises(requests.ConnectionError):
        RebasingHttpClient(f"http://127.0.0.1:{port}").request("GET", f"http://127.0.0.1:{port}/")


def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(echo: EchoServer) -> None:
    client = RebasingHttpClient(echo.url)
    with pytest.raises(requests.exceptions.InvalidURL):
        client.request("POST", echo.url + "/x", data={"a": "b"}, headers={"X-Note": "one\r\nX-Evil: two"})
    assert echo.bodies == []


def test_https_is_verified_against_the_sites_ca_bundle_and_a_peer_it_does_not_sign_is_refused(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    server = EchoServer()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki.cert_file, pki.key_file)
    server.server.socket = tls.wrap_socket(server.server.socket, server_side=True)
    url = server.url.replace("http://", "https://") + "/x"
    try:
        trusting = KeepAliveTransport(ca_bundle=str(pki.ca_file))
        answers = [trusting.request("POST", url, body=b"n=%d" % n, headers=FORM, timeout=5) for n in range(3)]
        trusting.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            KeepAliveTransport(ca_bundle=certifi.where()).request("POST", url, body=b"no", headers=FORM, timeout=5)
    finally:
        server.close()
    assert [a.body for a in answers] == [b"n=0", b"n=1", b"n=2"]
    assert server.bodies == [b"n=0", b"n=1", b"n=2"]
    assert server.connections == 1


def test_a_connection_idle_past_the_reuse_limit_is_not_reused(echo: EchoServer) -> None:
    """A server may close a kept-alive connection just as a request is written to it, and
    a NAT may drop one without a word: one idle for ``IDLE_REUSE_S`` is not reused."""
    now = [0.0]
    transport = KeepAliveTransport(ca_bundle=certifi.where(), clock=lambda: now[0])
    try:
        transport.request("POST", echo.url + "/x", body=b"1", headers=FORM, timeout=5)
        now[0] += IDLE_REUSE_S - 0.5
        transport.request("POST", echo.url + "/x", body=b"2", headers=FORM, timeout=5)
        assert echo.connections == 1
        now[0] += IDLE_REUSE_S
        transport.request("POST", echo.url + "/x", body=b"3", headers=FORM, timeout=5)
    finally:
        transport.close()
    assert echo.bodies == [b"1", b"2", b"3"]
    assert echo.connections == 2


def test_a_ca_bundle_that_is_not_there_fails_only_the_https_requests(
    echo: EchoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A wrong REQUESTS_CA_BUNDLE must not keep the hub or the router from starting: the
    client is built, plain HTTP works, and an HTTPS page fails as a connection error
    (which falls back to the other provider)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    client = RebasingHttpClient(echo.url)
    assert client.request("POST", echo.url + "/x", data={"To": "+1"}).status_code == 201
    with pytest.raises(requests.ConnectionError) as refused:
        client.request("POST", "https://127.0.0.1:9/x", data={"To": "+1"})
    assert isinstance(refused.value.__cause__, FileNotFoundError)  # the bundle, not the closed port


def test_a_ca_directory_is_read_as_hashed_certificates(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    hashed = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", str(pki.ca_file)], capture_output=True, text=True, check=True
    ).stdout.strip()
    directory = tmp_path / "certs"
    directory.mkdir()
    (directory / f"{hashed}.0").write_bytes(pki.ca_file.read_bytes())
    server = EchoServer()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki.cert_file, pki.key_file)
    server.server.socket = tls.wrap_socket(server.server.socket, server_side=True)
    transport = KeepAliveTransport(ca_bundle=str(directory))
    try:
        answer = transport.request(
            "POST", server.url.replace("http://", "https://") + "/x", body=b"ok", headers=FORM, timeout=5
        )
    finally:
        transport.close()
        server.close()
    assert answer.body == b"ok"
