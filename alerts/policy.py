"""Escalation policies: the registry's, nearest area first, else the built-in default.

The chosen policy is frozen into a snapshot when an incident opens, with every wait
made concrete, so a later registry edit never changes a running escalation.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg

from devices.kinds import Channel, EscalationTarget, IncidentKind


@dataclass(frozen=True, slots=True)
class Step:
    target: EscalationTarget
    channels: tuple[Channel, ...]
    wait_s: int
    repeats: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target.value,
            "channels": [c.value for c in self.channels],
            "wait_s": self.wait_s,
            "repeats": self.repeats,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Step:
        return cls(
            EscalationTarget(data["target"]),
            tuple(Channel(c) for c in data["channels"]),
            int(data["wait_s"]),
            int(data.get("repeats", 0)),
        )


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    policy_id: str
    steps: tuple[Step, ...]

    def to_json(self) -> dict[str, Any]:
        return {"policy_id": self.policy_id, "steps": [s.to_json() for s in self.steps]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PolicySnapshot:
        return cls(data["policy_id"], tuple(Step.from_json(s) for s in data["steps"]))


def default_red_policy(ack_timeout_s: int) -> PolicySnapshot:
    """DESIGN.md's default for an SOS or a fall."""
    voice_sms_console = (Channel.VOICE, Channel.SMS, Channel.CONSOLE)
    return PolicySnapshot(
        "built-in",
        (
            Step(EscalationTarget.GRID_WORKER, voice_sms_console, ack_timeout_s),
            Step(EscalationTarget.GUARDIANS, (Channel.VOICE, Channel.SMS), ack_timeout_s),
            Step(EscalationTarget.EMERGENCY_PLATFORM, (Channel.WEBHOOK,), ack_timeout_s),
            Step(EscalationTarget.OPERATORS, voice_sms_console, ack_timeout_s),
        ),
    )


def default_unregistered_policy(ack_timeout_s: int) -> PolicySnapshot:
    """An SOS from a wristband nobody registered: the county operators, then the platform."""
    return PolicySnapshot(
        "built-in-unregistered",
        (
            Step(EscalationTarget.OPERATORS, (Channel.VOICE, Channel.SMS, Channel.CONSOLE), ack_timeout_s),
            Step(EscalationTarget.EMERGENCY_PLATFORM, (Channel.WEBHOOK,), ack_timeout_s),
        ),
    )


def resolve_policy(
    conn: psycopg.Connection[tuple[Any, ...]], kind: IncidentKind, area_id: str | None, ack_timeout_s: int
) -> PolicySnapshot:
    """The active policy for ``kind`` nearest to ``area_id`` up the tree, else the default.

    Fall and SOS share the SOS default when the registry names no fall policy.
    """
    return policy_snapshot(kind, policy_rows(conn, kind, [area_id])[area_id], ack_timeout_s)


PolicyRow = tuple[str, Any]  # a policy's id and its steps as the registry holds them (a JSON list)


def policy_rows(
    conn: psycopg.Connection[tuple[Any, ...]], kind: IncidentKind, area_ids: Collection[str | None]
) -> dict[str | None, PolicyRow | None]:
    """The registry's policy for ``kind`` in each area (see :func:`resolve_policy`), in one
    statement for all of them (a mass event's alarms come from many grids at once)."""
    areas: list[str | None] = [*sorted({a for a in area_ids if a is not None})]
    if None in area_ids:
        areas.append(None)  # only a policy for the whole county (area_id NULL) applies
    found: dict[str | None, PolicyRow | None] = dict.fromkeys(area_ids)
    rows = conn.execute(
        """
        WITH RECURSIVE up(start, id, depth) AS (
            SELECT s, s, 0 FROM unnest(%(areas)s::text[]) AS s
            UNION ALL
            SELECT up.start, a.parent_id, up.depth + 1 FROM areas a JOIN up ON a.id = up.id
            WHERE a.parent_id IS NOT NULL
        )
        SELECT DISTINCT ON (s.start) s.start, p.id, p.steps FROM unnest(%(areas)s::text[]) AS s(start)
        JOIN escalation_policies p ON p.active AND p.kind = ANY(%(kinds)s)
        LEFT JOIN up ON up.start = s.start AND up.id = p.area_id
        WHERE p.area_id IS NULL OR up.id IS NOT NULL
        ORDER BY s.start, (p.kind = %(kind)s) DESC, coalesce(up.depth, 1000000), p.id
        """,
        {
            "areas": areas,
            "kind": kind.value,
            "kinds": [kind.value, IncidentKind.SOS.value] if kind is IncidentKind.FALL else [kind.value],
        },
    ).fetchall()
    for start, policy_id, steps in rows:
        if start in found:
            found[start] = (str(policy_id), steps)
    return found


def policy_snapshot(kind: IncidentKind, row: PolicyRow | None, ack_timeout_s: int) -> PolicySnapshot:
    """The frozen snapshot of a registry policy (:func:`policy_rows`), or the built-in default
    when the registry has none; raises on a policy the registry should never hold."""
    if row is None:
        if kind is IncidentKind.SOS_UNREGISTERED:
            return default_unregistered_policy(ack_timeout_s)
        return default_red_policy(ack_timeout_s)
    policy_id, steps = row
    return PolicySnapshot(
        policy_id,
        expand_repeats(
            Step(
                EscalationTarget(s["target"]),
                tuple(Channel(c) for c in s["channels"]),
                int(s.get("wait_s") or ack_timeout_s),
                int(s.get("repeats", 0)),
            )
            for s in steps
        ),
    )


def expand_repeats(steps: Iterable[Step]) -> tuple[Step, ...]:
    """A step with ``repeats = n`` becomes n + 1 consecutive steps in the frozen snapshot.

    The router then runs plain steps one after another: what runs is exactly what
    the snapshot lists.
    """
    expanded: list[Step] = []
    for step in steps:
        expanded.extend(Step(step.target, step.channels, step.wait_s, 0) for _ in range(step.repeats + 1))
    return tuple(expanded)
