"""The parser's shortcuts (issue 19) decide exactly what the long way decides.

- a topic's verdict is remembered: the remembered one equals a fresh classification;
- strings are only inspected for NUL and lone surrogates when the JSON text holds a
  ``\\u`` escape: for any JSON text, the verdict with the shortcut equals the verdict
  with every string inspected.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from devices import contract
from devices.contract import RejectReason, classify_topic, parse_message, parse_topic

SEGMENTS = st.sampled_from(
    ["shouhu", "v1", "wristband", "camera", "wb-0001", "cam-1", "telemetry", "sos", "health", "", "x"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(SEGMENTS, min_size=0, max_size=7), st.text(max_size=4))
def test_a_remembered_topic_verdict_is_the_verdict(segments: list[str], tail: str) -> None:
    topic = "/".join(segments) + tail
    first = parse_topic(topic)
    assert parse_topic(topic) == first == classify_topic(topic)


def test_long_topics_are_not_remembered() -> None:
    topic = "shouhu/v1/wristband/" + "w" * 500 + "/telemetry"
    assert parse_topic(topic) == classify_topic(topic)
    assert topic not in contract._topic_verdicts


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(JSON_VALUES, st.booleans())
def test_the_escape_shortcut_agrees_with_inspecting_every_string(value: object, ascii_only: bool) -> None:
    text = json.dumps({"msg_id": "m", "ts": "2026-12-04T00:00:00+00:00", "extra": value}, ensure_ascii=ascii_only)
    data = json.loads(text)
    full = contract._hostile_structure(data, escapes=True)
    assert contract._hostile_structure(data, escapes="\\u" in text) == full


def test_escaped_nul_and_lone_surrogate_are_still_refused() -> None:
    topic = "shouhu/v1/wristband/wb-0001/telemetry"
    for escaped, reason in (("\\u0000", RejectReason.BAD_TEXT), ("\\ud800", RejectReason.BAD_TEXT)):
        raw = ('{"msg_id": "m", "ts": "2026-12-04T00:00:00+00:00", "note": "a' + escaped + 'b"}').encode()
        verdict = parse_message(topic, raw)
        assert isinstance(verdict, contract.Rejected), verdict
        assert verdict.reason is reason


def test_deep_nesting_is_still_refused_without_escapes() -> None:
    deep = "[" * 40 + "]" * 40
    raw = ('{"msg_id": "m", "ts": "2026-12-04T00:00:00+00:00", "x": ' + deep + "}").encode()
    verdict = parse_message("shouhu/v1/wristband/wb-0001/telemetry", raw)
    assert isinstance(verdict, contract.Rejected)
    assert verdict.reason is RejectReason.TOO_DEEP
