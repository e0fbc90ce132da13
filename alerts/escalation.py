"""Escalation actions: the only module that writes ``escalation_actions``.

An incident escalates through due rows, one per step: the first step (written with
the incident, :func:`schedule_first_step`), each next step (scheduled when a step
runs), a step made due at once (:func:`advance`, when nobody the step paged can
still take it), the next round after the last step, a re-escalation check after an
acknowledgement (:func:`schedule_resolve_check`), stopping (:func:`stop`: the fencing
token bumped, every queued action retired) and the invariant sweep (:func:`sweep`:
an open red incident with no pending action gets its chain back).

What a due action does is decided by :func:`decide`, a pure function of the
incident's frozen policy, what the action and incident are now, and the time: the
rest of this module reads what it needs, asks, and writes the answer. Routers claim
due actions with ``FOR UPDATE SKIP LOCKED`` (:func:`claim_due`) and run them in
batches (:func:`run_due`), locking incidents in id order: incident → actions →
attempts (alerts/locks.py, docs/escalation.md "Locks").
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from prometheus_client import Counter, Histogram
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from alerts.attempts import NewPage, RecordedPage, queue_pages
from alerts.policy import PolicySnapshot
from alerts.recipients import Recipient, Rosters
from alerts.states import ACTIVE, OPEN_SQL, ActionKind, ActionState, IncidentState
from alerts.timeline import add_event, wake_routers
from devices.kinds import AttemptPurpose, Channel, EscalationTarget, Severity
from shouhu.db import Conn

log = logging.getLogger(__name__)

STEPS = Counter("shouhu_router_steps_total", "Escalation steps run, by target and result", ["target", "result"])
STEP_LATENESS = Histogram(
    "shouhu_router_step_lateness_seconds",
    "From when an escalation action fell due to when a router claimed it, by kind (step, resolve_check)",
    ["kind"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
INVARIANT_BREACHES = Counter(
    "shouhu_router_invariant_breaches_total",
    "Open red incidents found with no pending escalation action (repaired)",
)
SWEEPER_LOCK_KEY = 0x5348_4F55_4855_0002
PLATFORM = Recipient("platform", "emergency-platform", "应急呼叫平台", "", "platform")
# After the last step: the operators are paged again, by call and SMS.
EXHAUSTED_CHANNELS = (Channel.VOICE, Channel.SMS)
# A round that reached nobody waits the first step's wait before the next; a policy
# with no steps at all waits this.
EMPTY_POLICY_WAIT_S = 60


# --- the pure core ------------------------------------------------------------------------


class Verdict(StrEnum):
    STALE = "stale"  # the action's fencing token is older than the incident's: retired, nothing done
    STOPPED = "stopped"  # the incident no longer escalates: retired, nothing done
    PAGE = "page"  # run the step: page its target on its channels
    EXHAUSTED = "exhausted"  # every step ran: unreached, the operators paged again, the next round
    REESCALATE = "reescalate"  # acknowledged but not resolved in time: back on the chain
    NOTHING = "nothing"  # a resolve check for an incident no longer acknowledged


@dataclass(frozen=True, slots=True)
class EscalationState:
    """One due action and its incident, as read under the incident's lock."""

    incident_state: IncidentState
    incident_token: int
    kind: ActionKind
    token: int
    step: int
    round: int
    # When the hub's spool already paged this (first) step, while the database was down.
    spooled_at: datetime | None = None
    # The last round any step ran in (a re-escalation starts the one after it).
    last_round: int = 0


@dataclass(frozen=True, slots=True)
class Next:
    """The action to schedule: step ``step`` of round ``round``, due at ``due_at``."""

    step: int
    round: int
    due_at: datetime


@dataclass(frozen=True, slots=True)
class Decision:
    """What a due action does. ``then`` is scheduled, or ``if_nobody`` when the step paged nobody."""

    verdict: Verdict
    retire_as: ActionState
    target: EscalationTarget | None = None
    channels: tuple[Channel, ...] = ()
    then: Next | None = None
    if_nobody: Next | None = None

    def next_action(self, paged: bool) -> Next | None:
        return self.then if paged or self.if_nobody is None else self.if_nobody


def decide(snapshot: PolicySnapshot, state: EscalationState, now: datetime) -> Decision:
    """What the due action ``state`` does for an incident escalating by ``snapshot``, at ``now``.

    - a fencing token older than the incident's: retired as stale (the escalation was
      re-planned, or stopped, after the action was written);
    - a resolve check: the incident re-escalates from step 1 of the next round if it is
      still acknowledged, else nothing;
    - an incident no longer open or unreached: retired;
    - a step past the last: the chain is exhausted — the next round starts at once if
      anyone at all was paged in this one, else after the first step's wait (a round
      that reached nobody must not spin);
    - otherwise the step pages its target; the next step is due the step's wait after
      it ran (after the spool's first page, if the spool paged it), or at once if the
      step found nobody to page.
    """
    if state.token != state.incident_token:
        return Decision(Verdict.STALE, ActionState.STALE)
    if state.kind is ActionKind.RESOLVE_CHECK:
        if state.incident_state is not IncidentState.ACKNOWLEDGED:
            return Decision(Verdict.NOTHING, ActionState.DONE)
        return Decision(Verdict.REESCALATE, ActionState.DONE, then=Next(0, state.last_round + 1, now))
    if state.incident_state not in ACTIVE:
        return Decision(Verdict.STOPPED, ActionState.CANCELLED)
    steps = snapshot.steps
    if state.step >= len(steps):
        wait = steps[0].wait_s if steps else EMPTY_POLICY_WAIT_S
        return Decision(
            Verdict.EXHAUSTED,
            ActionState.DONE,
            target=EscalationTarget.OPERATORS,
            channels=EXHAUSTED_CHANNELS,
            then=Next(0, state.round + 1, now),
            if_nobody=Next(0, state.round + 1, now + timedelta(seconds=wait)),
        )
    step = steps[state.step]
    started = min(now, state.spooled_at) if state.spooled_at is not None else now
    return Decision(
        Verdict.PAGE,
        ActionState.DONE,
        target=step.target,
        channels=step.channels,
        then=Next(state.step + 1, state.round, started + timedelta(seconds=step.wait_s)),
        if_nobody=Next(state.step + 1, state.round, now),
    )


def next_round(last_round: int, now: datetime) -> Next:
    """The invariant's repair: step 1 of the round after the last, now (paging again beats paging nobody)."""
    return Next(0, last_round + 1, now)


# --- running due actions --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DueAction:
    id: int
    incident_id: int
    step: int
    round: int
    token: int
    kind: str = ActionKind.STEP.value
    # When it fell due (its lateness is measured when it is claimed).
    due_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class IncidentView:
    id: int
    state: IncidentState
    token: int
    resident_id: str | None
    area_id: str | None
    snapshot: PolicySnapshot


@dataclass(frozen=True, slots=True)
class Pager:
    """What a router can page with: who it is, the rosters' zone, its channels, whether a platform is set.

    ``recorded``: channels whose pages are recorded as sent with the step, not sent by
    a sender (the console's: its "sending" is the row, alerts/notifiers/console.py).
    """

    worker: str
    zone: ZoneInfo
    channels: Collection[Channel]
    platform: bool
    recorded: frozenset[Channel] = frozenset()


def claim_due(conn: Conn, now: datetime, limit: int) -> list[DueAction]:
    """Due actions, locked, at most one per incident; new incidents' first steps before any other.

    A batch of first steps is run on its own, so a new SOS's first pages never wait
    for other incidents' later steps to be written. A second due action of an
    incident already in the batch is left for the next batch (its lock is held till
    this one commits), so each batch sees every incident as one step left it.
    """
    cursor = conn.cursor(row_factory=class_row(DueAction))
    for first_steps_only in (True, False):
        # The state written out, not a parameter: the query must match the partial index.
        rows = cursor.execute(
            f"""
            SELECT id, incident_id, step, round, token, kind, due_at FROM escalation_actions
            WHERE state = '{ActionState.PENDING}' AND due_at <= %(now)s
              AND (NOT %(first)s OR (kind = '{ActionKind.STEP}' AND step = 0 AND round = 0))
            ORDER BY due_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
            """,
            {"now": now, "first": first_steps_only, "limit": limit},
        ).fetchall()
        if rows:
            actions: dict[int, DueAction] = {}
            for action in rows:
                actions.setdefault(action.incident_id, action)
            for action in actions.values():
                if action.due_at is not None:
                    STEP_LATENESS.labels(action.kind).observe(max(0.0, (now - action.due_at).total_seconds()))
            return list(actions.values())
    return []


def _lock_incidents(conn: Conn, incident_ids: list[int]) -> dict[int, IncidentView]:
    # In id order (alerts/locks.py): two routers whose batches share an incident (two
    # due actions of one incident, claimed by each) wait for each other instead of
    # deadlocking. The whole row is read here, so it is taken here, not by lock_incidents.
    rows = conn.execute(
        "SELECT id, state, escalation_token, resident_id, area_id, policy_snapshot"
        " FROM incidents WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
        (sorted(set(incident_ids)),),
    ).fetchall()
    return {
        row[0]: IncidentView(row[0], IncidentState(row[1]), row[2], row[3], row[4], PolicySnapshot.from_json(row[5]))
        for row in rows
    }


class _Batch:
    """The rows one batch of actions writes, gathered so they go out in a few statements."""

    def __init__(self, now: datetime, actor: str, recorded: frozenset[Channel] = frozenset()) -> None:
        self.now = now
        self.actor = actor
        self.recorded = recorded
        self.pages: list[NewPage] = []
        self.recorded_pages: list[RecordedPage] = []
        self.retired: list[tuple[int, str]] = []
        self.events: list[tuple[Any, ...]] = []
        self.scheduled: list[tuple[Any, ...]] = []
        self.unreached: list[int] = []

    def event(self, incident_id: int, event: str, detail: dict[str, Any]) -> None:
        self.events.append((incident_id, self.now, event, self.actor, Jsonb(detail)))

    def schedule(self, incident: IncidentView, nxt: Next | None) -> None:
        if nxt is not None:
            self.scheduled.append((incident.id, nxt.step, nxt.round, incident.token, nxt.due_at))

    def flush_first(self, conn: Conn) -> None:
        """Incidents left unreached, the pages, the retired actions: all the next reads depend on."""
        if self.unreached:
            conn.execute(
                "UPDATE incidents SET state = %s, updated_at = %s WHERE id = ANY(%s) AND state = %s",
                (IncidentState.UNREACHED, self.now, self.unreached, IncidentState.OPEN),
            )
        self.recorded_pages = queue_pages(conn, self.pages, self.now, recorded=self.recorded)
        if self.retired:
            conn.execute(
                """
                UPDATE escalation_actions a SET state = r.state, done_at = %s
                FROM unnest(%s::bigint[], %s::text[]) AS r(id, state) WHERE a.id = r.id
                """,
                (self.now, [i for i, _s in self.retired], [s for _i, s in self.retired]),
            )

    def flush_rest(self, conn: Conn) -> None:
        """The timeline entries, in the order they were decided, and the next actions."""
        for page in self.recorded_pages:
            # What settling a sent attempt writes (alerts/attempts.py, settle), for a recorded page.
            self.event(
                page.incident_id,
                "attempt_sent",
                {
                    "purpose": page.purpose.value,
                    "channel": page.channel.value,
                    "to": page.address,
                    "step": page.step,
                    "round": page.round,
                    "attempt_id": page.id,
                    "provider_id": page.provider_id,
                    "error": None,
                },
            )
        if self.events:
            # add_event's row, many at once (alerts/timeline.py).
            conn.cursor().executemany(
                "INSERT INTO incident_events (incident_id, at, event, actor, detail) VALUES (%s, %s, %s, %s, %s)",
                self.events,
            )
        if self.scheduled:
            conn.cursor().executemany(
                "INSERT INTO escalation_actions (incident_id, step, round, token, due_at)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                self.scheduled,
            )


def run_due(conn: Conn, actions: list[DueAction], now: datetime, pager: Pager) -> None:
    """Run one batch of claimed actions: read all they need, decide each, then write all at once.

    Each action is decided as when actions ran one per transaction (the batch holds
    one action per incident, so no decision depends on another's writes); only the
    reads and writes are gathered, to save round trips. The batch has one moment,
    ``now``: rosters are read, and ``done_at`` stamped, as of its claim.
    """
    incidents = _lock_incidents(conn, [a.incident_id for a in actions])
    spooled = _spooled_first_pages(conn, actions)
    last_rounds = _last_rounds(conn, [a.incident_id for a in actions if a.kind == ActionKind.RESOLVE_CHECK])
    decided: list[tuple[DueAction, IncidentView, Decision]] = []
    for action in actions:
        incident = incidents[action.incident_id]
        state = EscalationState(
            incident.state,
            incident.token,
            ActionKind(action.kind),
            action.token,
            action.step,
            action.round,
            spooled.get(incident.id),
            last_rounds.get(incident.id, 0),
        )
        decided.append((action, incident, decide(incident.snapshot, state, now)))
    rosters = Rosters(conn, now, pager.zone)
    rosters.prepare([(d.target, i.resident_id, i.area_id) for _a, i, d in decided if d.target is not None])
    batch = _Batch(now, pager.worker, pager.recorded)
    exhausted: list[tuple[IncidentView, DueAction, Decision]] = []
    for action, incident, decision in decided:
        batch.retired.append((action.id, decision.retire_as.value))
        if decision.verdict is Verdict.REESCALATE:
            _reescalate(conn, incident, decision, now, pager.worker)
        elif decision.verdict is Verdict.PAGE:
            _run_step(rosters, batch, action, incident, decision, pager, spooled.get(incident.id))
        elif decision.verdict is Verdict.EXHAUSTED:
            _exhausted(rosters, batch, action, incident, pager)
            exhausted.append((incident, action, decision))
    with conn.pipeline():
        batch.flush_first(conn)
        paged = _paged_rounds(conn, [(i.id, a.round) for i, a, _d in exhausted])
        for incident, action, decision in exhausted:
            _after_round(batch, incident, action, decision, (incident.id, action.round) in paged)
        batch.flush_rest(conn)


def _spooled_first_pages(conn: Conn, actions: list[DueAction]) -> dict[int, datetime]:
    """When the hub's spool sent the first step's pages, for the incidents it paged.

    While the database was down the hub paged from its spool (hub/spool.py), and
    reconciling wrote those pages as the first step's attempts before the step ran.
    The step then pages only whom the spool did not (the attempts' key makes the
    others no-ops) and its wait runs from the spool's first page, not from now.
    """
    first = [a.incident_id for a in actions if a.kind == ActionKind.STEP and a.step == 0 and a.round == 0]
    if not first:
        return {}
    rows = conn.execute(
        "SELECT incident_id, min(created_at) FROM notification_attempts"
        " WHERE incident_id = ANY(%s) AND purpose = %s AND round = 0 AND step = 0 GROUP BY incident_id",
        (first, AttemptPurpose.PAGE),
    ).fetchall()
    return {int(incident_id): started for incident_id, started in rows}


def _last_rounds(conn: Conn, incident_ids: list[int]) -> dict[int, int]:
    if not incident_ids:
        return {}
    rows = conn.execute(
        "SELECT incident_id, max(round) FROM escalation_actions WHERE incident_id = ANY(%s) AND kind = %s"
        " GROUP BY incident_id",
        (incident_ids, ActionKind.STEP),
    ).fetchall()
    return {int(i): int(r) for i, r in rows}


def _pages(
    batch: _Batch,
    incident: IncidentView,
    action: DueAction,
    channels: tuple[Channel, ...],
    recipients: list[Recipient],
    pager: Pager,
) -> int:
    created = 0
    for recipient in recipients:
        for channel in channels:
            if channel not in pager.channels:
                continue
            purpose = AttemptPurpose.CAP_ALERT if channel is Channel.WEBHOOK else AttemptPurpose.PAGE
            batch.pages.append(
                NewPage(
                    incident.id,
                    action.id,
                    purpose,
                    action.round,
                    action.step,
                    recipient.kind,
                    recipient.id,
                    recipient.phone,
                    channel,
                )
            )
            created += 1
    if created == 0 and recipients:
        log.error("step %s of incident %s: no notifier for %s", action.step, incident.id, channels)
    return created


def _run_step(
    rosters: Rosters,
    batch: _Batch,
    action: DueAction,
    incident: IncidentView,
    decision: Decision,
    pager: Pager,
    spooled_at: datetime | None,
) -> None:
    """Page the step's people; say who, or that nobody was reachable; schedule the next step."""
    assert decision.target is not None
    target = decision.target
    if target is EscalationTarget.EMERGENCY_PLATFORM:
        recipients = [PLATFORM] if pager.platform else []
    else:
        recipients = rosters.resolve(target, resident_id=incident.resident_id, area_id=incident.area_id)
    paged = _pages(batch, incident, action, decision.channels, recipients, pager) > 0 or spooled_at is not None
    if paged:
        STEPS.labels(target.value, "paged").inc()
        detail: dict[str, Any] = {
            "step": action.step,
            "round": action.round,
            "target": target.value,
            "recipients": [{"id": r.id, "name": r.name, "role": r.role} for r in recipients],
        }
        if spooled_at is not None:
            detail["spooled_at"] = spooled_at.isoformat()
        batch.event(incident.id, "step_started", detail)
    else:
        # Never silent: nobody reachable for this step → say so and go on at once.
        STEPS.labels(target.value, "no_recipients").inc()
        batch.event(
            incident.id,
            "no_recipients",
            {
                "step": action.step,
                "round": action.round,
                "target": target.value,
                "channels": [c.value for c in decision.channels],
            },
        )
    batch.schedule(incident, decision.next_action(paged))


def _exhausted(rosters: Rosters, batch: _Batch, action: DueAction, incident: IncidentView, pager: Pager) -> None:
    """Every step ran and nobody took it: unreached, alarm the operators; ``_after_round`` starts over."""
    batch.unreached.append(incident.id)
    batch.event(incident.id, "unreached", {"round": action.round})
    operators = rosters.resolve(EscalationTarget.OPERATORS, resident_id=None, area_id=None)
    _pages(batch, incident, action, EXHAUSTED_CHANNELS, operators, pager)


def _paged_rounds(conn: Conn, rounds: list[tuple[int, int]]) -> set[tuple[int, int]]:
    """The (incident, round) pairs with any page attempt, the operators' just written included."""
    if not rounds:
        return set()
    rows = conn.execute(
        """
        SELECT DISTINCT a.incident_id, a.round
        FROM notification_attempts a
        JOIN unnest(%s::bigint[], %s::integer[]) AS r(incident_id, round)
          ON a.incident_id = r.incident_id AND a.round = r.round
        WHERE a.purpose = %s
        """,
        ([i for i, _r in rounds], [r for _i, r in rounds], AttemptPurpose.PAGE),
    ).fetchall()
    return {(int(incident_id), int(round_)) for incident_id, round_ in rows}


def _after_round(batch: _Batch, incident: IncidentView, action: DueAction, decision: Decision, paged: bool) -> None:
    """Start the next round: at once if this one paged anyone, else after the first step's wait."""
    if not paged:
        # A whole round found nobody to page, operators included: repeat, but after
        # the first step's wait, not at once — a tight loop would starve every other
        # incident's pages.
        log.critical("incident %s: round %s reached nobody at all", incident.id, action.round)
        STEPS.labels("round", "nobody_reachable").inc()
        batch.event(incident.id, "nobody_reachable", {"round": action.round})
    batch.schedule(incident, decision.next_action(paged))


def _reescalate(conn: Conn, incident: IncidentView, decision: Decision, now: datetime, worker: str) -> None:
    """Acknowledged but still unresolved after SHOUHU_RESOLVE_TIMEOUT_S: back on the chain.

    Rare, so written at once rather than gathered with the batch's writes.
    """
    assert decision.then is not None
    conn.execute(
        "UPDATE incidents SET state = %s, updated_at = %s WHERE id = %s", (IncidentState.OPEN, now, incident.id)
    )
    add_event(
        conn,
        incident.id,
        now,
        "reescalated",
        worker,
        {"reason": "acknowledged but not resolved in time", "round": decision.then.round},
    )
    _insert_step(conn, incident.id, incident.token, decision.then)


def _insert_step(conn: Conn, incident_id: int, token: int, nxt: Next) -> None:
    conn.execute(
        "INSERT INTO escalation_actions (incident_id, step, round, token, due_at)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (incident_id, nxt.step, nxt.round, token, nxt.due_at),
    )


# --- the other writers' entry points ------------------------------------------------------


def schedule_first_step(conn: Conn, incident_id: int, due_at: datetime) -> None:
    """A new red incident's first step, due at ``due_at`` (the press), under the first fencing token."""
    schedule_first_steps(conn, [(incident_id, due_at)])


def schedule_first_steps(conn: Conn, steps: Sequence[tuple[int, datetime]]) -> None:
    """:func:`schedule_first_step` for several (incident, due at) in one statement (a mass event)."""
    if not steps:
        return
    conn.execute(
        "INSERT INTO escalation_actions (incident_id, step, round, token, due_at)"
        " SELECT incident_id, 0, 0, 1, due_at FROM unnest(%s::bigint[], %s::timestamptz[]) AS t(incident_id, due_at)",
        ([incident_id for incident_id, _ in steps], [due_at for _, due_at in steps]),
    )


def first_step_id(conn: Conn, incident_id: int) -> int | None:
    """The id of the incident's first step (round 0, step 0), if it has one."""
    row = conn.execute(
        "SELECT id FROM escalation_actions WHERE incident_id = %s AND kind = %s AND step = 0 AND round = 0"
        " ORDER BY id LIMIT 1",
        (incident_id, ActionKind.STEP),
    ).fetchone()
    return None if row is None else int(row[0])


def stop(conn: Conn, incident_id: int, now: datetime) -> int:
    """Stop the escalation: bump the fencing token and retire every queued action; the new token.

    The incident is locked already (alerts/locks.py). Actions a router holds right now
    are skipped, not waited for: a router claims an action before it locks the
    incident, and refuses it by the bumped token when it gets there.
    """
    row = conn.execute(
        "UPDATE incidents SET escalation_token = escalation_token + 1, updated_at = %s WHERE id = %s"
        " RETURNING escalation_token",
        (now, incident_id),
    ).fetchone()
    assert row is not None
    conn.execute(
        """
        UPDATE escalation_actions SET state = %(cancelled)s, done_at = %(now)s
        WHERE id IN (SELECT id FROM escalation_actions WHERE incident_id = %(incident)s AND state = %(pending)s
                     FOR UPDATE SKIP LOCKED)
        """,
        {"cancelled": ActionState.CANCELLED, "now": now, "incident": incident_id, "pending": ActionState.PENDING},
    )
    return int(row[0])


def schedule_resolve_check(conn: Conn, incident_id: int, token: int, due_at: datetime) -> None:
    """After an acknowledgement: at ``due_at`` (now + SHOUHU_RESOLVE_TIMEOUT_S), still unresolved → re-escalate."""
    conn.execute(
        "INSERT INTO escalation_actions (incident_id, kind, step, round, token, due_at) VALUES (%s, %s, 0, 0, %s, %s)",
        (incident_id, ActionKind.RESOLVE_CHECK, token, due_at),
    )


def advance(conn: Conn, incident_id: int, round_: int, step: int, now: datetime, reason: str) -> bool:
    """Make the step after ``step`` due now; whether it was still waiting (and so was moved)."""
    advanced = conn.execute(
        "UPDATE escalation_actions SET due_at = %s WHERE incident_id = %s AND state = %s AND kind = %s"
        " AND round = %s AND step = %s AND due_at > %s RETURNING id",
        (now, incident_id, ActionState.PENDING, ActionKind.STEP, round_, step + 1, now),
    ).fetchall()
    if not advanced:
        return False
    add_event(conn, incident_id, now, "step_advanced", None, {"reason": reason, "step": step, "round": round_})
    wake_routers(conn, "advanced")
    return True


def bring_forward(conn: Conn, incident_id: int, now: datetime) -> tuple[ActionKind, int, int] | None:
    """督办: make the incident's next pending action due now; its (kind, step, round), or None.

    The incident is locked already (alerts/locks.py). A pending step becomes due at
    once, so the router pages its target now — the incident rises one level, and every
    later step comes forward with it (each wait counts from when its step ran). A
    pending resolve check (acknowledged, not resolved in time) puts the incident back
    on the chain now. An action a router holds right now is skipped, not waited for
    (it is running anyway); one already due is left as it is. Either gives None.
    """
    row = conn.execute(
        """
        UPDATE escalation_actions SET due_at = %(now)s
        WHERE id = (SELECT id FROM escalation_actions
                    WHERE incident_id = %(incident)s AND state = %(pending)s AND due_at > %(now)s
                    ORDER BY due_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
        RETURNING kind, step, round
        """,
        {"now": now, "incident": incident_id, "pending": ActionState.PENDING},
    ).fetchone()
    if row is None:
        return None
    wake_routers(conn, "supervised")
    return ActionKind(row[0]), int(row[1]), int(row[2])


def sweep(conn: Conn, now: datetime, worker: str) -> list[int]:
    """Every open red incident has a pending action: find any that has none, repair it, report it.

    Runs in the caller's transaction.
    One sweeper at a time (an advisory lock); the others skip. A breach is a bug or a
    hand edit; it is repaired by restarting the chain from the first step, because
    paging again beats paging nobody.
    """
    locked = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (SWEEPER_LOCK_KEY,)).fetchone()
    if not locked or not locked[0]:
        return []
    rows = conn.execute(
        f"""
        SELECT i.id, i.escalation_token FROM incidents i
        WHERE i.severity = %s AND i.state IN {OPEN_SQL}
          AND NOT EXISTS (SELECT 1 FROM escalation_actions a WHERE a.incident_id = i.id AND a.state = %s)
        FOR UPDATE OF i SKIP LOCKED
        """,
        (Severity.RED, ActionState.PENDING),
    ).fetchall()
    repaired: list[int] = []
    for incident_id, token in rows:
        INVARIANT_BREACHES.inc()
        log.error("incident %s had no pending escalation action: restarting its chain", incident_id)
        last = conn.execute(
            "SELECT coalesce(max(round), 0) FROM escalation_actions WHERE incident_id = %s", (incident_id,)
        ).fetchone()
        nxt = next_round(int(last[0]) if last else 0, now)
        _insert_step(conn, incident_id, token, nxt)
        conn.execute(
            "UPDATE incidents SET state = %s, updated_at = %s WHERE id = %s AND state = %s",
            (IncidentState.OPEN, now, incident_id, IncidentState.ACKNOWLEDGED),
        )
        add_event(
            conn,
            incident_id,
            now,
            "invariant_repaired",
            worker,
            {"reason": "no pending escalation action", "round": nxt.round},
        )
        repaired.append(int(incident_id))
    if repaired:
        wake_routers(conn, "repaired")
    return repaired


__all__ = [
    "Decision",
    "DueAction",
    "EscalationState",
    "Next",
    "Pager",
    "Verdict",
    "advance",
    "bring_forward",
    "claim_due",
    "decide",
    "first_step_id",
    "next_round",
    "run_due",
    "schedule_first_step",
    "schedule_resolve_check",
    "stop",
    "sweep",
]
