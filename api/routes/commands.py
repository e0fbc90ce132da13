"""Commands to a connected watch: ``POST /api/v1/devices/{id}/commands``
(docs/contract.md, "Commands").

Only the watch gateway holds the watches' TCP connections, so the API asks it over the
broker: it publishes the command on the wristband's ``…/command`` topic (QoS 1) and
waits briefly for the gateway's ``…/command_result``. The answer is 202 either way and
says honestly whether the frames reached the watch: a watch that is not connected, or
no gateway answering, is ``delivered: false`` with the reason.

The SOS numbers are the people an SOS pages first, resolved now as the escalation
resolves them (``alerts.recipients``): the grid workers on duty for the wearer's grid
(or the nearest area above with anyone on duty), then the guardians by priority — at
most three, the watch's SOS1 … SOS3.
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field, model_validator

from alerts.recipients import Rosters
from alerts.watch_numbers import sos_numbers
from api.access import WATCH_COMMANDERS, may_see_device
from api.deps import (
    API_PREFIX,
    ConnDep,
    CurrentToken,
    Now,
    Scope,
    SettingsDep,
    Zone,
    not_found,
    tuple_rows,
    write_audit,
)
from devices.command_exchange import BrokerUnavailable, exchange
from devices.commands import (
    MAX_UPLOAD_INTERVAL_S,
    CommandName,
    CommandResult,
    NotDelivered,
    WatchCommand,
)
from devices.kinds import DeviceKind
from shouhu.mqtt_address import broker_url

router = APIRouter(prefix=f"{API_PREFIX}/devices", tags=["devices"])

# How long the API waits for the gateway's result: it answers at once when the watch is
# not connected, after writing the frames when it is.
RESULT_TIMEOUT_S = 5.0


class CommandCreate(BaseModel):
    command: CommandName
    seconds: int | None = Field(
        default=None, ge=1, le=MAX_UPLOAD_INTERVAL_S, description="set_upload_interval only: the reporting interval."
    )

    @model_validator(mode="after")
    def _seconds_for_upload_only(self) -> CommandCreate:
        if (self.command is CommandName.SET_UPLOAD_INTERVAL) != (self.seconds is not None):
            raise ValueError("seconds is required by set_upload_interval and taken by no other command")
        return self


class CommandPublic(BaseModel):
    command_id: str
    delivered: bool
    reason: NotDelivered | None
    """Why not delivered: not_connected, write_failed, unreadable, no_gateway; null when delivered."""


@router.post(
    "/{device_id}/commands",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        403: {"description": "The token's role may not command watches."},
        409: {"description": "set_sos_numbers, but nobody is on duty and the wearer has no guardian."},
        503: {"description": "The broker is unavailable."},
    },
)
def create_command(
    conn: ConnDep,
    token: CurrentToken,
    scope: Scope,
    now: Now,
    zone: Zone,
    settings: SettingsDep,
    device_id: str,
    body: CommandCreate,
) -> CommandPublic:
    """Send a command to a wristband's watch through the watch gateway; 202 says whether it was delivered."""
    if token.role not in WATCH_COMMANDERS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {token.role.value} token cannot command watches")
    row = conn.execute(
        "SELECT d.kind, d.resident_id, r.grid_id FROM devices d"
        " LEFT JOIN residents r ON r.id = d.resident_id WHERE d.id = %s AND d.active",
        (device_id,),
    ).fetchone()
    if row is None or row["kind"] != DeviceKind.WRISTBAND or not may_see_device(
        token.role, scope, row["kind"], row["grid_id"]
    ):
        raise not_found("wristband", device_id)
    phones: list[str] = []
    if body.command is CommandName.SET_SOS_NUMBERS:
        with tuple_rows(conn) as plain:
            phones = sos_numbers(Rosters(plain, now, zone), row["grid_id"], row["resident_id"])
        if not phones:
            raise HTTPException(
                status.HTTP_409_CONFLICT, "no grid worker is on duty and the wearer has no guardian: no number to set"
            )
    command = WatchCommand(
        command_id=uuid.uuid4().hex, command=body.command, phones=phones, seconds=body.seconds
    )
    try:
        results = exchange(broker_url(settings), [(device_id, command)], RESULT_TIMEOUT_S)
    except BrokerUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"the broker is unavailable: {exc}") from exc
    result = results.get(command.command_id) or CommandResult(
        command_id=command.command_id, delivered=False, reason=NotDelivered.NO_GATEWAY
    )
    with conn.transaction():
        # The numbers themselves stay out of the audit log: how many were set is enough.
        write_audit(
            conn,
            token,
            now,
            "device_command",
            f"device:{device_id}",
            {
                "command": body.command.value,
                "command_id": command.command_id,
                "seconds": body.seconds,
                "numbers": len(phones),
                "delivered": result.delivered,
                "reason": result.reason,
            },
        )
    return CommandPublic(command_id=command.command_id, delivered=result.delivered, reason=result.reason)
