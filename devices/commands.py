"""Commands to a connected watch, over the broker (docs/contract.md, "Commands").

The API publishes a ``WatchCommand`` on ``shouhu/v1/wristband/{id}/command`` (QoS 1);
the watch gateway, which alone holds the watches' TCP connections, sends the frames to
that wristband's watch if it is connected and publishes a ``CommandResult`` on
``shouhu/v1/wristband/{id}/command_result``. Neither is device data: the hub takes
both channels as outbound (``OUTBOUND_CHANNELS``) and never dead-letters them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, Field, StringConstraints

from devices.contract import TOPIC_PREFIX
from devices.kinds import DeviceKind

COMMAND_CHANNEL = "command"
RESULT_CHANNEL = "command_result"
COMMANDS = f"{TOPIC_PREFIX}/{DeviceKind.WRISTBAND}/+/{COMMAND_CHANNEL}"
RESULTS = f"{TOPIC_PREFIX}/{DeviceKind.WRISTBAND}/+/{RESULT_CHANNEL}"
MAX_SOS_NUMBERS = 3
MAX_UPLOAD_INTERVAL_S = 86_400

# What a watch's SOS key can dial (gateway/watch_frames.py PHONE): digits, an optional +.
WatchPhone = Annotated[str, StringConstraints(pattern=r"^\+?[0-9]{3,20}$")]


def command_topic(wristband_id: str) -> str:
    return f"{TOPIC_PREFIX}/{DeviceKind.WRISTBAND}/{wristband_id}/{COMMAND_CHANNEL}"


def result_topic(wristband_id: str) -> str:
    return f"{TOPIC_PREFIX}/{DeviceKind.WRISTBAND}/{wristband_id}/{RESULT_CHANNEL}"


class CommandName(StrEnum):
    LOCATE = "locate"  # CR
    SET_SOS_NUMBERS = "set_sos_numbers"  # SOS1,<phone> … SOS3,<phone>
    SET_UPLOAD_INTERVAL = "set_upload_interval"  # UPLOAD,<seconds>


class NotDelivered(StrEnum):
    """Why a command did not reach the watch (``CommandResult.reason``)."""

    NOT_CONNECTED = "not_connected"  # the gateway has no connection from that watch
    WRITE_FAILED = "write_failed"  # the connection broke while the frames were written
    UNREADABLE = "unreadable"  # the gateway could not read the command
    NO_GATEWAY = "no_gateway"  # no gateway answered in time (the API's own verdict)
    EXPIRED = "expired"  # it reached the gateway after its sender stopped waiting: not sent


class WatchCommand(BaseModel):
    """The payload on ``…/command``: one command, with everything the frames need."""

    command_id: str = Field(min_length=1, max_length=64)
    command: CommandName
    phones: list[WatchPhone] = Field(default_factory=list, max_length=MAX_SOS_NUMBERS)
    seconds: int | None = Field(default=None, ge=1, le=MAX_UPLOAD_INTERVAL_S)
    # When the sender stops waiting for the result; later the gateway does not send it.
    expires_at: AwareDatetime | None = None


class CommandResult(BaseModel):
    """The payload on ``…/command_result``: ``reason`` is None when delivered."""

    command_id: str = Field(min_length=1, max_length=64)
    delivered: bool
    reason: NotDelivered | None = None
