"""An Aliyun county under test: Chinese mobile numbers (Aliyun takes no other), the
Aliyun-compatible simulator checking the official SDK's signatures with the test's
AccessKey, and the settings the notifiers are built from."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from devices.registry import load_registry
from devices.registry_file import RegistryFile
from simulators.aliyun import create_aliyun_service
from tests.support.services import serve_app

KEY_ID, KEY_SECRET = "LTAIfailoverTest", "failover-test-secret"
WORKER, OPERATOR, GUARDIAN = "+8613800138001", "+8613800138009", "+8613700137001"
WRISTBAND = "wb1"
COUNTY: dict[str, Any] = {
    "areas": [
        {"id": "county", "name": "守护县", "level": "county"},
        {"id": "shanli", "name": "山里镇", "level": "township", "parent": "county"},
        {"id": "dongguan", "name": "东关社区", "level": "community", "parent": "shanli"},
        {"id": "grid1", "name": "东关村1组", "level": "grid", "parent": "dongguan"},
    ],
    "staff": [
        {"id": "gw", "name": "董思远", "role": "grid_worker", "phone": WORKER, "areas": ["grid1"]},
        {"id": "op", "name": "值班员", "role": "operator", "phone": OPERATOR, "areas": ["county"]},
    ],
    "rosters": [
        {"staff": "gw", "area": "grid1", "start": "00:00", "end": "00:00"},
        {"staff": "op", "area": "county", "start": "00:00", "end": "00:00"},
    ],
    "residents": [
        {
            "id": "r1",
            "name": "王奶奶",
            "grid": "grid1",
            "address": "东关村1组1号",
            "phone": "+8613900139000",
            "guardians": [{"id": "g1", "name": "王小明", "phone": GUARDIAN}],
        }
    ],
    "devices": [{"id": WRISTBAND, "kind": "wristband", "resident": "r1"}],
}


ALIYUN_SETTINGS = {
    "aliyun_access_key_id": KEY_ID,
    "aliyun_access_key_secret": KEY_SECRET,
    "aliyun_voice_number": "057188880000",
    "aliyun_tts_page_code": "TTS_100001",
    "aliyun_tts_taken_code": "TTS_100002",
    "aliyun_tts_declined_code": "TTS_100003",
    "aliyun_sms_sign_name": "守护",
    "aliyun_sms_page_template": "SMS_200001",
    "aliyun_sms_notice_template": "SMS_200002",
}


@pytest.fixture
def county(database_url: str) -> str:
    with psycopg.connect(database_url) as conn:
        load_registry(conn, RegistryFile.model_validate(COUNTY))
    return database_url


@pytest.fixture
def aliyun_sim() -> Iterator[str]:
    """The Aliyun-compatible simulator, checking the SDK's signatures with the test's AccessKey."""
    yield from serve_app(create_aliyun_service(KEY_ID, KEY_SECRET, announce=lambda _line: None))
