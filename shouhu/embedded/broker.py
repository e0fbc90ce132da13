"""The embedded MQTT broker: amqtt, for ``shouhu up`` on a machine with no broker.

amqtt speaks MQTT 3.1.1 only and has no shared subscriptions (see DESIGN.md,
"Facts measured"), and it keeps sessions in memory: good for a demo or a laptop,
never for production, where Mosquitto or EMQX with persistence runs instead.

It runs as a child process (``python -m shouhu.embedded.broker --port N``) so that
a broker fault cannot take the hub down with it, and so tests can kill it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

DEFAULT_PORT = 1883


def broker_config(host: str, port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


def is_listening(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


async def serve(host: str, port: int) -> None:
    from amqtt.broker import Broker

    broker = Broker(broker_config(host, port))
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await broker.shutdown()


def start_embedded_broker(port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> subprocess.Popen[bytes]:
    """Start the broker in a child process and wait until it accepts connections."""
    process = subprocess.Popen(
        [sys.executable, "-m", "shouhu.embedded.broker", "--host", host, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        process_group=0,  # Ctrl-C reaches `shouhu up`, which stops the hub before the broker
    )
    wait_until_listening(process, host, port, "the embedded MQTT broker")
    return process


def wait_until_listening(
    process: subprocess.Popen[bytes],
    host: str,
    port: int,
    name: str,
    timeout_s: float = 20.0,
    log: Callable[[], str] = str,
) -> None:
    """Wait until ``process`` (a broker just started) accepts connections on ``host``:``port``.

    Raises RuntimeError, with its stderr and ``log()``, if it exits first, and kills it
    if it does not listen within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:  # exited (a port that answers is then someone else's)
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"{name} exited with {process.returncode}: {err[-2000:]}{log()}")
        if is_listening(host, port):
            return
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"{name} did not listen on {host}:{port} within {timeout_s:g} s")
        time.sleep(0.05)


def ensure_local_broker(port: int = DEFAULT_PORT) -> subprocess.Popen[bytes] | None:
    """Use a broker already listening on 127.0.0.1:``port``, or start the embedded one.

    Returns the child process when one was started, None when a broker was there.
    """
    if is_listening("127.0.0.1", port):
        return None
    return start_embedded_broker(port)


def main() -> None:
    parser = argparse.ArgumentParser(description="Shouhu's embedded MQTT 3.1.1 broker (amqtt)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
