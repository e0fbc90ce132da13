"""An incident's story, as the console tells it: each step, each call and text with its
person and how it ended, who took it, and how it was closed.

Built from the rows ``alerts/`` writes (attempts and the timeline), read through
``queries``; nothing here writes. A provider's status callbacks, keypresses, SMS
replies and retries are not lines of their own: each is told once, as the result of
the attempt it belongs to, or as the person's act it caused (taken, declined).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from api.consoles.i18n import WORDS, Lang, actor_label, maybe, person_label, word
from api.consoles.queries import AttemptRow, EventRow, NextStep
from devices.kinds import AttemptPurpose, Channel

# Told through the attempt they belong to (its result) or the act they caused.
FOLDED_EVENTS = frozenset(
    {
        "attempt_sent",
        "attempt_failed",
        "attempt_cancelled",
        "attempt_resent",
        "attempt_result_late",
        "retry_scheduled",
        "channel_given_up",
        "keypress",
        "sms_reply",
        "acknowledge_ignored",
        "stored",  # the same instant as "opened"
    }
)
# Events a person caused: their line names the person.
PERSON_EVENTS = frozenset(
    {"acknowledged", "declined", "resolved", "supervised", "task_started", "task_closed", "cancel_refused", "cancelled"}
)
# The longest failure reason shown: a provider's error is for the log, its gist for the page.
REASON_CHARS = 120


class Tone(StrEnum):
    """How a line reads at a glance (a CSS class; never colour alone: the words say it)."""

    GOOD = "good"
    BAD = "bad"
    WAIT = "wait"
    QUIET = "quiet"
    NEUTRAL = "neutral"


@dataclass(frozen=True, slots=True)
class StoryLine:
    """One line of the story: when, what (whom), and how it ended."""

    at: datetime
    kind: str  # "step", "attempt", "act" (a person's), "event", or "next" (the step still to come)
    headline: str
    result: str
    tone: Tone


def _w(lang: Lang, key: str, **values: Any) -> str:
    return word(lang, key).format(**values)


def _joined(lang: Lang, who: str, did: str) -> str:
    """Who did what: 董思远（网格员）接单; in English, "Dong Siyuan (grid worker) took it"."""
    if not who:
        return did
    return f"{who}{did}" if lang is Lang.ZH else f"{who} {did}"


def _colon(lang: Lang) -> str:
    return "：" if lang is Lang.ZH else ": "


def attempt_result(lang: Lang, row: AttemptRow) -> tuple[str, Tone]:
    """What became of one attempt, in words: rang, no answer, busy, pressed 1, delivered, failed (why)…"""
    state = row.state
    if state == "pending":
        return (word(lang, "res_sending"), Tone.WAIT) if row.in_flight else (word(lang, "res_waiting"), Tone.WAIT)
    if state == "sent":
        key = {
            Channel.VOICE.value: "res_rang",
            Channel.CONSOLE.value: "res_shown",
            Channel.WEBHOOK.value: "res_accepted",
        }.get(row.channel, "res_sent")
        return word(lang, key), Tone.GOOD
    if state == "delivered":
        return word(lang, "res_delivered"), Tone.GOOD
    if state == "answered":
        key = {"1": "res_pressed_1", "2": "res_pressed_2"}.get(row.digit or "", "res_answered")
        return word(lang, key), Tone.GOOD
    if state == "cancelled":
        return word(lang, "res_cancelled"), Tone.QUIET
    key = f"res_{state}"
    text = word(lang, key) if key in WORDS else state
    if state == "failed" and row.error:
        text += _colon(lang) + row.error[:REASON_CHARS]
    return text, Tone.BAD


def _recipient(lang: Lang, row: AttemptRow) -> str:
    if row.recipient_kind == "platform":
        return word(lang, "role_platform")
    return person_label(lang, row.recipient_name or row.recipient_id, row.recipient_role)


def attempt_line(lang: Lang, row: AttemptRow) -> StoryLine:
    channel = f"ch_{row.channel}"
    parts = [word(lang, channel) if channel in WORDS else row.channel]
    if row.purpose != AttemptPurpose.PAGE.value and f"purpose_{row.purpose}" in WORDS:
        parts.append(word(lang, f"purpose_{row.purpose}"))
    headline = " · ".join(parts) + " → " + _recipient(lang, row)
    if row.attempt > 1:
        tries = _w(lang, "try_n", n=row.attempt)
        headline += f"（{tries}）" if lang is Lang.ZH else f" ({tries})"
    result, tone = attempt_result(lang, row)
    return StoryLine(_when(row), "attempt", headline, result, tone)


def _when(row: AttemptRow) -> datetime:
    """When the attempt went out, or, for one that never did, when it was called off."""
    return row.settled_at if row.state == "cancelled" else row.due_at


def _who(lang: Lang, event: EventRow) -> str:
    if event.actor_name:
        return person_label(lang, event.actor_name, event.actor_role)
    return actor_label(lang, event.actor)


def _step(lang: Lang, detail: dict[str, Any]) -> str:
    step = _w(lang, "step_n", n=int(detail.get("step", 0)) + 1)
    if int(detail.get("round", 0)) > 0:
        step = _w(lang, "round_n", n=int(detail["round"]) + 1) + " " + step
    return step


def _paging(lang: Lang, detail: dict[str, Any], target: str) -> str:
    """A step's line: 第 1 步：通知网格员."""
    key = f"target_{target}"
    whom = word(lang, key) if key in WORDS else target
    return f"{_step(lang, detail)}{_colon(lang)}{word(lang, 'paging')}{whom}"


def _via(lang: Lang, detail: dict[str, Any]) -> str:
    key = f"via_{detail.get('via', '')}"
    return word(lang, key) if key in WORDS else ""


def event_line(lang: Lang, event: EventRow, outcomes: Mapping[str, str]) -> StoryLine | None:
    """The line an event adds to the story, or None when another line tells it already."""
    name, detail = event.event, event.detail
    if name in FOLDED_EVENTS or name.startswith("delivery_"):
        return None
    if name == "step_started":
        return StoryLine(event.at, "step", _paging(lang, detail, str(detail.get("target", ""))), "", Tone.NEUTRAL)
    if name == "no_recipients":
        return StoryLine(event.at, "step", _step(lang, detail), word(lang, "no_recipients"), Tone.BAD)
    if name == "opened":
        kind = str(detail.get("kind", ""))
        return StoryLine(event.at, "event", word(lang, "sos_stored"), maybe(lang, kind), Tone.NEUTRAL)
    if name == "acknowledged":
        taken = _joined(lang, _who(lang, event), word(lang, "took_it"))
        return StoryLine(event.at, "act", taken, _via(lang, detail), Tone.GOOD)
    if name == "declined":
        declined = _joined(lang, _who(lang, event), word(lang, "cannot_go"))
        return StoryLine(event.at, "act", declined, _via(lang, detail), Tone.NEUTRAL)
    if name == "resolved":
        outcome = str(detail.get("outcome", ""))
        result = outcomes.get(outcome) or maybe(lang, outcome)
        if detail.get("note"):
            result += f"{_colon(lang)}{detail['note']}" if lang is Lang.ZH else f" — {detail['note']}"
        headline = _joined(lang, _who(lang, event), word(lang, "resolved_as"))
        return StoryLine(event.at, "act", headline, result, Tone.GOOD)
    if name == "cancelled" and (event.actor or "").startswith("device:"):
        return StoryLine(event.at, "act", word(lang, "cancelled_on_band"), "", Tone.QUIET)
    if name == "provider_fallback":
        error = str(detail.get("error") or "")[:REASON_CHARS]
        failed, to = str(detail.get("failed", "")), str(detail.get("to_provider", ""))
        return StoryLine(event.at, "event", _w(lang, name, failed=failed, error=error, to=to), "", Tone.NEUTRAL)
    if name == "providers_down":
        providers = "、".join(str(p) for p in detail.get("providers", []))
        return StoryLine(event.at, "event", _w(lang, name, providers=providers), "", Tone.BAD)
    headline = maybe(lang, name)
    if name in PERSON_EVENTS:
        who = _who(lang, event)
        headline = f"{who} · {headline}" if who else headline
    return StoryLine(event.at, "event", headline, "", Tone.NEUTRAL)


def _anchors(events: list[EventRow], attempts: list[AttemptRow]) -> dict[int, EventRow | None]:
    """The event each attempt follows: its step's start, or the event that caused it (a notice's cause)."""
    steps: dict[tuple[int, int], EventRow] = {}
    by_id = {event.id: event for event in events}
    for event in events:
        if event.event == "step_started":
            steps.setdefault((int(event.detail.get("round", 0)), int(event.detail.get("step", 0))), event)
    anchors: dict[int, EventRow | None] = {}
    for row in attempts:
        if row.purpose in (AttemptPurpose.PAGE.value, AttemptPurpose.CAP_ALERT.value):
            anchor = steps.get((row.round, row.step))
        else:  # a notice, re-page or CAP update is keyed by the event that caused it (alerts/attempts.py)
            anchor = by_id.get(row.step)
        if anchor is None or row.state == "cancelled":  # called off: after what called it off
            anchor = max((e for e in events if e.at <= _when(row)), key=lambda e: (e.at, e.id), default=anchor)
        anchors[row.id] = anchor
    return anchors


def story(
    lang: Lang, events: list[EventRow], attempts: list[AttemptRow], outcomes: Mapping[str, str]
) -> list[StoryLine]:
    """Every line, oldest first; an attempt comes after the event that caused it, even at the same instant.

    ``outcomes``: a resolve's outcome in the words of the form that chose it.
    """
    lines: list[tuple[tuple[datetime, int, int, int], StoryLine]] = []
    for event in events:
        line = event_line(lang, event, outcomes)
        if line is not None:
            lines.append(((event.at, event.id, 0, 0), line))
    anchors = _anchors(events, attempts)
    for row in attempts:
        anchor = anchors[row.id]
        at = _when(row) if anchor is None else max(_when(row), anchor.at)
        lines.append(((at, 0 if anchor is None else anchor.id, 1, row.id), attempt_line(lang, row)))
    return [line for _key, line in sorted(lines, key=lambda entry: entry[0])]


def next_line(lang: Lang, upcoming: NextStep) -> StoryLine:
    """What happens next if nobody takes it: "第 2 步：通知监护人" at its due time."""
    detail = {"step": upcoming.step, "round": upcoming.round}
    headline = _paging(lang, detail, upcoming.target or "operators")
    return StoryLine(upcoming.due_at, "next", headline, "", Tone.WAIT)
