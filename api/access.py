"""Who may see and do what: the one place the API's access rules live.

The roles themselves are the tokens' (``shouhu.tokens.Role``). Here are the kinds of
device, incident and care task each role sees, the role sets that gate each route
and console page, and the ``may_see_*`` checks. The REST routes, the consoles
(``api/consoles``) and the live feed (``api/live.py``, ``api/routes/events.py``)
all import from here, so a page, its REST route and the feed cannot drift apart;
a console page and the REST route it mirrors are gated by the same set object.

Nothing here touches the database or the request: plain data and pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from devices.kinds import DeviceKind, IncidentKind, TaskKind
from shouhu.tokens import Role

# Roles that may read a resident at all (a technician sees cameras, not residents).
RESIDENT_READERS: frozenset[Role] = frozenset({Role.ADMIN, Role.OPERATOR, Role.GRID_WORKER, Role.PLATFORM})
# Roles that may read health and location (PIPL sensitive personal information).
SENSITIVE_READERS: frozenset[Role] = frozenset({Role.ADMIN, Role.OPERATOR, Role.GRID_WORKER, Role.PLATFORM})
# Roles that see phone numbers in timelines unmasked.
PHONE_READERS: frozenset[Role] = frozenset({Role.ADMIN, Role.OPERATOR, Role.PLATFORM})
# Who may take or close an incident: not a technician (cameras only) for red ones.
ACKNOWLEDGERS: frozenset[Role] = frozenset({Role.ADMIN, Role.OPERATOR, Role.GRID_WORKER, Role.PLATFORM})
# Who may manage tokens.
TOKEN_ADMINS: frozenset[Role] = frozenset({Role.ADMIN})

# The care tasks each role sees and works: a grid worker visits, a technician repairs.
TASK_KINDS_OF_ROLE: dict[Role, frozenset[TaskKind]] = {
    Role.ADMIN: frozenset(TaskKind),
    Role.OPERATOR: frozenset(TaskKind),
    Role.GRID_WORKER: frozenset({TaskKind.VISIT}),
    Role.TECHNICIAN: frozenset({TaskKind.REPAIR}),
    Role.PLATFORM: frozenset(),
}
# The devices each role may put under maintenance (not the ones it may see: see
# ``visible_device_kinds``).
MAINTAINED_KINDS_OF_ROLE: dict[Role, frozenset[DeviceKind]] = {
    Role.ADMIN: frozenset(DeviceKind),
    Role.OPERATOR: frozenset(DeviceKind),
    Role.TECHNICIAN: frozenset({DeviceKind.CAMERA}),
    Role.GRID_WORKER: frozenset({DeviceKind.WRISTBAND}),
    Role.PLATFORM: frozenset(),
}
# A window over a whole area silences residents' wristbands too (visits, battery
# notices): only roles answerable for both. A technician silences cameras one by one.
AREA_SETTERS: frozenset[Role] = frozenset({Role.ADMIN, Role.OPERATOR})

# Camera uptime and open repair orders: the technician's board (/console/tech), the
# uptime route (/api/v1/cameras/uptime) and the repair rounds (/api/v1/tasks/repair-rounds)
# are gated by this one set: the roles that work repair orders.
CAMERA_CARETAKERS: frozenset[Role] = frozenset(
    role for role, kinds in TASK_KINDS_OF_ROLE.items() if TaskKind.REPAIR in kinds
)
# The visit rate (/api/v1/reports/visits): the roles that work or oversee visits, each
# within its areas (a grid worker sees the grids it is bound to).
VISIT_REPORT_READERS: frozenset[Role] = frozenset(
    role for role, kinds in TASK_KINDS_OF_ROLE.items() if TaskKind.VISIT in kinds
)
# The governance overview (/console/overview): incidents, response times and gaps county-wide.
OVERVIEW_READERS: frozenset[Role] = frozenset({Role.ADMIN, Role.OPERATOR})
# The response figures (/api/v1/reports/response) are the overview's: the same set.
RESPONSE_READERS = OVERVIEW_READERS
# Who may supervise (督办) an overdue incident or task: the governance centre.
SUPERVISORS: frozenset[Role] = frozenset({Role.ADMIN, Role.OPERATOR})
# Who may send commands to a connected watch (locate, SOS numbers, reporting interval).
WATCH_COMMANDERS: frozenset[Role] = frozenset({Role.ADMIN, Role.OPERATOR})


@dataclass(frozen=True, slots=True)
class AreaScope:
    """The areas a token may see; ``area_ids`` is ``None`` for the whole county."""

    area_ids: frozenset[str] | None

    def allows(self, area_id: str | None) -> bool:
        return self.area_ids is None or (area_id is not None and area_id in self.area_ids)

    def as_param(self) -> list[str] | None:
        """For SQL written as ``(%(scope)s::text[] IS NULL OR x = ANY(%(scope)s))``."""
        return None if self.area_ids is None else sorted(self.area_ids)


def visible_device_kinds(role: Role) -> frozenset[DeviceKind]:
    """A wristband leads to its wearer, so only roles that may read residents see wristbands."""
    if role in RESIDENT_READERS:
        return frozenset(DeviceKind)
    return frozenset({DeviceKind.CAMERA})


def visible_incident_kinds(role: Role) -> frozenset[IncidentKind]:
    """Roles that may not read residents (technicians) see camera incidents only."""
    if role in RESIDENT_READERS:
        return frozenset(IncidentKind)
    return frozenset({IncidentKind.CAMERA_OFFLINE})


def may_see_device(role: Role, scope: AreaScope, kind: str, area_id: str | None) -> bool:
    """Whether a token of ``role`` within ``scope`` sees this device at all (else it is a 404)."""
    return DeviceKind(kind) in visible_device_kinds(role) and scope.allows(area_id)


def may_see_incident(role: Role, scope: AreaScope, kind: str, area_id: str | None) -> bool:
    """Whether a token of ``role`` within ``scope`` sees this incident at all (else it is a 404)."""
    return IncidentKind(kind) in visible_incident_kinds(role) and scope.allows(area_id)


def may_see_task(role: Role, scope: AreaScope, kind: str, area_id: str | None) -> bool:
    """Whether a token of ``role`` within ``scope`` sees this task at all (else it is a 404)."""
    return TaskKind(kind) in TASK_KINDS_OF_ROLE[role] and scope.allows(area_id)
