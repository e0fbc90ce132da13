"""Sending commands to watches over the broker and awaiting the gateway's results
(docs/contract.md, "Commands").

One short-lived MQTT connection per exchange, subscribed to the results before any
command goes out, so a gateway's immediate answer cannot be missed. Each command
carries ``expires_at``, the end of the wait: a command the broker delivers later (a
gateway that was down, whose persistent session kept it) is not written to the watch,
since its sender has already been told ``no_gateway``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import ValidationError

from devices.commands import RESULTS, CommandResult, WatchCommand, command_topic
from shouhu.mqtt_address import BrokerAddress


class BrokerUnavailable(Exception):
    pass


class _Exchange:
    """One exchange's state, filled in on paho's network thread."""

    def __init__(self, outgoing: list[tuple[str, WatchCommand]]) -> None:
        self.outgoing = outgoing
        self.wanted = {command.command_id for _band, command in outgoing}
        self.found: dict[str, CommandResult] = {}
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.first = threading.Event()
        self.done = threading.Event()

    def on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, *_rest: Any) -> None:
        if not reason.is_failure:
            client.subscribe(RESULTS, qos=1)

    def on_subscribe(self, client: mqtt.Client, _userdata: Any, _mid: Any, reasons: Any, *_rest: Any) -> None:
        if any(reason.is_failure for reason in reasons):
            return  # refused: the wait ends as "no subscription acknowledged"
        self.subscribed.set()
        for band, command in self.outgoing:
            client.publish(command_topic(band), command.model_dump_json(), qos=1)
        if not self.outgoing:
            self.done.set()

    def on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            result = CommandResult.model_validate_json(message.payload)
        except ValidationError:
            return
        with self.lock:
            if result.command_id in self.wanted:
                self.found[result.command_id] = result
                self.first.set()
                if len(self.found) == len(self.wanted):
                    self.done.set()


def exchange(
    mqtt_url: str,
    commands: Sequence[tuple[str, WatchCommand]],
    timeout: float,
    first_within: float | None = None,
) -> dict[str, CommandResult]:
    """Publish each (wristband id, command) and await the results, by ``command_id``.

    Returns once every command is answered or ``timeout`` seconds have passed, or when
    no result at all came within ``first_within`` seconds (a gateway answers at once,
    so silence means none is running); a command missing from the answer had no
    gateway answer in time. Raises ``BrokerUnavailable`` when the broker cannot be
    reached or does not take the subscription."""
    # The end of the wait, on the wall clock: the gateway compares it with its own.
    expires_at = datetime.now(UTC) + timedelta(seconds=timeout + (first_within or 0.0))
    state = _Exchange([(band, command.model_copy(update={"expires_at": expires_at})) for band, command in commands])
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"shouhu-command-{uuid.uuid4().hex[:12]}",
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=True,
    )
    address = BrokerAddress.parse(mqtt_url)
    address.configure(client)
    client.on_connect = state.on_connect
    client.on_subscribe = state.on_subscribe
    client.on_message = state.on_message
    try:
        client.connect(address.host, address.port, keepalive=30)
    except OSError as exc:
        raise BrokerUnavailable(str(exc)) from exc
    client.loop_start()
    try:
        if first_within is None or state.first.wait(first_within):
            state.done.wait(timeout)
        if not state.subscribed.is_set():
            raise BrokerUnavailable("no subscription acknowledged")
    finally:
        client.disconnect()
        client.loop_stop()
    with state.lock:
        return dict(state.found)
