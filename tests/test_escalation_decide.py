"""The escalation's pure core, ``alerts.escalation.decide``: no database, no clock but the one passed in.

Each case is a policy, a due action with its incident as read under the incident's
lock, and the decision: whether the action pages (whom, on which channels), what it
is retired as, and which action comes next — when somebody was paged, and when
nobody was.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from alerts.escalation import Decision, EscalationState, Next, Verdict, decide, next_round
from alerts.policy import PolicySnapshot, Step, default_red_policy, expand_repeats
from alerts.states import ActionKind, ActionState, IncidentState
from devices.kinds import Channel, EscalationTarget

NOW = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
VOICE_SMS = (Channel.VOICE, Channel.SMS)
DEFAULT = default_red_policy(120)
UNEVEN = PolicySnapshot(
    "uneven",
    (
        Step(EscalationTarget.GRID_WORKER, (Channel.VOICE, Channel.SMS, Channel.CONSOLE), 90),
        Step(EscalationTarget.GUARDIANS, VOICE_SMS, 300),
    ),
)
REPEATING = PolicySnapshot("repeating", expand_repeats([Step(EscalationTarget.GUARDIANS, VOICE_SMS, 60, repeats=2)]))
EMPTY = PolicySnapshot("empty", ())


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def state(
    step: int = 0,
    round_: int = 0,
    *,
    incident: IncidentState = IncidentState.OPEN,
    kind: ActionKind = ActionKind.STEP,
    token: int = 1,
    incident_token: int = 1,
    spooled_at: datetime | None = None,
    last_round: int = 0,
) -> EscalationState:
    return EscalationState(incident, incident_token, kind, token, step, round_, spooled_at, last_round)


@dataclass(frozen=True)
class Case:
    name: str
    snapshot: PolicySnapshot
    state: EscalationState
    verdict: Verdict
    retire_as: ActionState
    target: EscalationTarget | None = None
    channels: tuple[Channel, ...] = ()
    if_paged: Next | None = None
    if_nobody: Next | None = None


CASES = [
    # --- the chain, step by step
    Case(
        "the first step pages the grid workers; the guardians are due after its wait",
        DEFAULT,
        state(0),
        Verdict.PAGE,
        ActionState.DONE,
        EscalationTarget.GRID_WORKER,
        (Channel.VOICE, Channel.SMS, Channel.CONSOLE),
        Next(1, 0, at(120)),
        Next(1, 0, NOW),
    ),
    Case(
        "the second step pages the guardians",
        DEFAULT,
        state(1),
        Verdict.PAGE,
        ActionState.DONE,
        EscalationTarget.GUARDIANS,
        VOICE_SMS,
        Next(2, 0, at(120)),
        Next(2, 0, NOW),
    ),
    Case(
        "the third step sends the platform its CAP alert",
        DEFAULT,
        state(2),
        Verdict.PAGE,
        ActionState.DONE,
        EscalationTarget.EMERGENCY_PLATFORM,
        (Channel.WEBHOOK,),
        Next(3, 0, at(120)),
        Next(3, 0, NOW),
    ),
    Case(
        "the last step pages the operators; the step after it is the end of the round",
        DEFAULT,
        state(3),
        Verdict.PAGE,
        ActionState.DONE,
        EscalationTarget.OPERATORS,
        (Channel.VOICE, Channel.SMS, Channel.CONSOLE),
        Next(4, 0, at(120)),
        Next(4, 0, NOW),
    ),
    Case(
        "each step waits its own time",
        UNEVEN,
        state(1),
        Verdict.PAGE,
        ActionState.DONE,
        EscalationTarget.GUARDIANS,
        VOICE_SMS,
        Next(2, 0, at(300)),
        Next(2, 0, NOW),
    ),
    Case(
        "a repeated step runs again, as the next step of the snapshot",
        REPEATING,
        state(1),
        Verdict.PAGE,
        ActionState.DONE,
        EscalationTarget.GUARDIANS,
        VOICE_SMS,
        Next(2, 0, at(60)),
        Next(2, 0, NOW),
    ),
    Case(
        "a later round runs its steps under its own number",
        DEFAULT,
        state(2, 3),
        Verdict.PAGE,
        ActionState.DONE,
        EscalationTarget.EMERGENCY_PLATFORM,
        (Channel.WEBHOOK,),
        Next(3, 3, at(120)),
        Next(3, 3, NOW),
    ),
    Case(
        "an unreached incident keeps escalating",
        DEFAULT,
        state(0, 1, incident=IncidentState.UNREACHED),
        Verdict.PAGE,
        ActionState.DONE,
        EscalationTarget.GRID_WORKER,
        (Channel.VOICE, Channel.SMS, Channel.CONSOLE),
        Next(1, 1, at(120)),
        Next(1, 1, NOW),
    ),
    # --- due times
    Case(
        "the spool paged the first step 30 s ago: the next step's wait runs from then",
        DEFAULT,
        state(0, spooled_at=at(-30)),
        Verdict.PAGE,
        ActionState.DONE,
        EscalationTarget.GRID_WORKER,
        (Channel.VOICE, Channel.SMS, Channel.CONSOLE),
        Next(1, 0, at(90)),
        Next(1, 0, NOW),
    ),
    Case(
        "a spool's clock ahead of ours never delays the next step",
        DEFAULT,
        state(0, spooled_at=at(45)),
        Verdict.PAGE,
        ActionState.DONE,
        EscalationTarget.GRID_WORKER,
        (Channel.VOICE, Channel.SMS, Channel.CONSOLE),
        Next(1, 0, at(120)),
        Next(1, 0, NOW),
    ),
    # --- the end of a round
    Case(
        "after the last step: unreached, the operators by call and SMS, the next round at once",
        DEFAULT,
        state(4, 0),
        Verdict.EXHAUSTED,
        ActionState.DONE,
        EscalationTarget.OPERATORS,
        VOICE_SMS,
        Next(0, 1, NOW),
        Next(0, 1, at(120)),
    ),
    Case(
        "a round that reached nobody waits the first step's wait, not the last's",
        UNEVEN,
        state(2, 5, incident=IncidentState.UNREACHED),
        Verdict.EXHAUSTED,
        ActionState.DONE,
        EscalationTarget.OPERATORS,
        VOICE_SMS,
        Next(0, 6, NOW),
        Next(0, 6, at(90)),
    ),
    Case(
        "a policy with no steps is exhausted at once and never spins",
        EMPTY,
        state(0),
        Verdict.EXHAUSTED,
        ActionState.DONE,
        EscalationTarget.OPERATORS,
        VOICE_SMS,
        Next(0, 1, NOW),
        Next(0, 1, at(60)),
    ),
    # --- acknowledgements, resolutions, cancels: the escalation stops
    Case(
        "an acknowledged incident's step is retired, nobody paged",
        DEFAULT,
        state(1, incident=IncidentState.ACKNOWLEDGED),
        Verdict.STOPPED,
        ActionState.CANCELLED,
    ),
    Case(
        "a resolved incident's step is retired",
        DEFAULT,
        state(2, incident=IncidentState.RESOLVED),
        Verdict.STOPPED,
        ActionState.CANCELLED,
    ),
    Case(
        "a cancelled incident's step is retired",
        DEFAULT,
        state(0, incident=IncidentState.CANCELLED),
        Verdict.STOPPED,
        ActionState.CANCELLED,
    ),
    Case(
        "the end of a round for an acknowledged incident pages nobody",
        DEFAULT,
        state(4, incident=IncidentState.ACKNOWLEDGED),
        Verdict.STOPPED,
        ActionState.CANCELLED,
    ),
    # --- fencing
    Case(
        "a step written under an older token is stale, whatever the incident's state",
        DEFAULT,
        state(1, token=1, incident_token=2),
        Verdict.STALE,
        ActionState.STALE,
    ),
    Case(
        "stale before stopped: an old step of an acknowledged incident",
        DEFAULT,
        state(1, token=2, incident_token=3, incident=IncidentState.ACKNOWLEDGED),
        Verdict.STALE,
        ActionState.STALE,
    ),
    Case(
        "a resolve check under an older token (acknowledged, re-escalated, acknowledged again) is stale",
        DEFAULT,
        state(kind=ActionKind.RESOLVE_CHECK, token=2, incident_token=4, incident=IncidentState.ACKNOWLEDGED),
        Verdict.STALE,
        ActionState.STALE,
    ),
    # --- re-escalation
    Case(
        "acknowledged and still not resolved: back on the chain, step 1 of the next round, now",
        DEFAULT,
        state(kind=ActionKind.RESOLVE_CHECK, token=2, incident_token=2, incident=IncidentState.ACKNOWLEDGED),
        Verdict.REESCALATE,
        ActionState.DONE,
        if_paged=Next(0, 1, NOW),
    ),
    Case(
        "re-escalation starts after the last round that ran",
        DEFAULT,
        state(
            kind=ActionKind.RESOLVE_CHECK, token=3, incident_token=3, incident=IncidentState.ACKNOWLEDGED, last_round=4
        ),
        Verdict.REESCALATE,
        ActionState.DONE,
        if_paged=Next(0, 5, NOW),
    ),
    Case(
        "a resolve check for an incident resolved meanwhile does nothing",
        DEFAULT,
        state(kind=ActionKind.RESOLVE_CHECK, token=2, incident_token=2, incident=IncidentState.RESOLVED),
        Verdict.NOTHING,
        ActionState.DONE,
    ),
    Case(
        "a resolve check for an incident open again (the sweep restarted it) does nothing",
        DEFAULT,
        state(kind=ActionKind.RESOLVE_CHECK, token=2, incident_token=2, incident=IncidentState.OPEN),
        Verdict.NOTHING,
        ActionState.DONE,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide(case: Case) -> None:
    decision = decide(case.snapshot, case.state, NOW)
    assert decision.verdict is case.verdict
    assert decision.retire_as is case.retire_as
    assert decision.target == case.target
    assert decision.channels == case.channels
    assert decision.next_action(paged=True) == case.if_paged
    assert decision.next_action(paged=False) == (case.if_nobody if case.if_nobody is not None else case.if_paged)


def test_a_decision_depends_only_on_its_arguments() -> None:
    """Pure: the same snapshot, state and time give the same decision; another time moves only the due times."""
    first = decide(DEFAULT, state(1), NOW)
    assert decide(DEFAULT, state(1), NOW) == first
    later = decide(DEFAULT, state(1), at(7))
    assert later == Decision(
        Verdict.PAGE,
        ActionState.DONE,
        EscalationTarget.GUARDIANS,
        VOICE_SMS,
        then=Next(2, 0, at(127)),
        if_nobody=Next(2, 0, at(7)),
    )


def test_a_step_with_nobody_reachable_goes_on_at_once_every_step_of_the_chain() -> None:
    """Nobody reachable anywhere: each step hands over at once, and only the end of the round waits."""
    due = NOW
    step, round_ = 0, 0
    seen: list[tuple[int, int, datetime]] = []
    for _ in range(len(DEFAULT.steps) + 2):
        decision = decide(DEFAULT, state(step, round_), due)
        nxt = decision.next_action(paged=False)
        assert nxt is not None
        seen.append((nxt.step, nxt.round, nxt.due_at))
        step, round_, due = nxt.step, nxt.round, nxt.due_at
    assert seen == [
        (1, 0, NOW),
        (2, 0, NOW),
        (3, 0, NOW),
        (4, 0, NOW),
        (0, 1, at(120)),
        (1, 1, at(120)),
    ]


def test_an_unanswered_chain_runs_on_the_documented_timetable() -> None:
    """docs/escalation.md: steps at 0, 120, 240, 360; unreached at 480 and step 1 again at once."""
    due = NOW
    step, round_ = 0, 0
    timetable: list[tuple[float, Verdict, EscalationTarget | None]] = []
    for _ in range(7):
        decision = decide(DEFAULT, state(step, round_), due)
        timetable.append(((due - NOW).total_seconds(), decision.verdict, decision.target))
        nxt = decision.next_action(paged=True)
        assert nxt is not None
        step, round_, due = nxt.step, nxt.round, nxt.due_at
    assert timetable == [
        (0, Verdict.PAGE, EscalationTarget.GRID_WORKER),
        (120, Verdict.PAGE, EscalationTarget.GUARDIANS),
        (240, Verdict.PAGE, EscalationTarget.EMERGENCY_PLATFORM),
        (360, Verdict.PAGE, EscalationTarget.OPERATORS),
        (480, Verdict.EXHAUSTED, EscalationTarget.OPERATORS),
        (480, Verdict.PAGE, EscalationTarget.GRID_WORKER),
        (600, Verdict.PAGE, EscalationTarget.GUARDIANS),
    ]


def test_the_sweep_restarts_after_the_last_round() -> None:
    assert next_round(0, NOW) == Next(0, 1, NOW)
    assert next_round(7, at(3)) == Next(0, 8, at(3))
