"""Schemathesis against the API's own OpenAPI document: for every operation, generated
requests (an admin token for the whole county, the demo county loaded, some incidents,
tasks and windows to find) never get a server error, and every answer — status code,
content type, body — matches what the document says.

The API is served by uvicorn on a real port, as in production; the database is the
session's PostgreSQL. Examples per operation are kept small so the suite stays fast;
the run is deterministic (derandomized) so CI sees the same cases every time.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from alerts.care_sweep import sweep
from api.main import create_app
from devices.registry import load_registry
from shouhu.embedded.postgres import LocalPostgres
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token
from simulators.phone_network import create_phone_network
from tests.support.care import RULES, heard, last_will
from tests.support.database import demo_county, fresh_database
from tests.support.escalation import FROM, PHONE_SID, press
from tests.support.services import serve_app

NOW = datetime.now(UTC)
# The live feed streams until the client leaves: it has its own tests.
NOT_FUZZED = ("/api/v1/events",)


@pytest.fixture(scope="module")
def served(postgres: LocalPostgres) -> Iterator[tuple[str, str]]:
    """(base URL, admin token) of the API over a county with something in it."""
    for url in fresh_database(postgres):
        with psycopg.connect(url, autocommit=True) as conn:
            load_registry(conn, demo_county())
            press(url, "wb-0001", NOW - timedelta(minutes=5))
            last_will(conn, "wb-0002", NOW - timedelta(hours=2))
            heard(conn, "cam-002", NOW - timedelta(hours=1), reported_online=False, reported_reason="power")
            sweep(conn, NOW, RULES, lock_key=0x7E57_F022)
            secret = create_token(conn, role=Role.ADMIN, areas=[], label="fuzz", now=NOW, expires_at=None)
        # A phone network, so that asking for a sign-in code is answered as documented.
        network = create_phone_network(PHONE_SID, "fuzz-twilio-token", announce=lambda _line: None)
        for phone in serve_app(network):
            settings = Settings(
                database_url=url,
                twilio_auth_token="fuzz-twilio-token",
                twilio_account_sid=PHONE_SID,
                twilio_from=FROM,
                twilio_api_base=phone,
            )
            for base in serve_app(create_app(settings)):
                yield base, secret


# The document is the app's own; it needs no database to be generated.
UNUSED = Settings(database_url="postgresql://unused@127.0.0.1:1/unused")
schema = schemathesis.openapi.from_dict(create_app(UNUSED).openapi()).exclude(
    path=NOT_FUZZED[0]
)
# Requests that fit the document. Schemathesis 4 also generates negative ones by default,
# among them header names HTTP does not allow, which uvicorn refuses before the app sees
# them (a 400 in text/plain): the app's own refusals are tested route by route.
schema.config.generation.update(modes=[GenerationMode.POSITIVE])


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(case: Any, served: tuple[str, str]) -> None:
    base, secret = served
    case.call_and_validate(
        base_url=base,
        headers={"Authorization": f"Bearer {secret}"},
        # A request can fit the schema and still name an area that does not exist or
        # break a rule between fields (exactly one of device_id and area_id): those get
        # a 422 that names the field, which this check would call a rejection.
        excluded_checks=[positive_data_acceptance],
    )
