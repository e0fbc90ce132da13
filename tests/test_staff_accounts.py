"""Staff accounts against the real database and the phone-network simulator: sign-in by a
code texted to the phone (expiry by the clock passed in, wrong codes, lock-out, rate
limits), operators' passwords, tokens and sessions that belong to people, deactivation
in the registry, and one name for whoever acted, everywhere the API and SMS say it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from api.deps import SESSION_COOKIE, get_now
from api.main import create_app
from devices.registry import load_registry
from devices.registry_file import parse_registry
from shouhu.accounts import (
    SignInRefused,
    SignInRules,
    find_staff,
    issue_code,
    locked_until,
    person_label,
    prune_sign_in,
    set_password,
    sign_in_with_code,
    sign_in_with_password,
)
from shouhu.sessions import authenticate_session, open_staff_session
from shouhu.settings import Settings
from shouhu.tokens import Role, authenticate, create_token
from tests.support.callbacks import Stack
from tests.support.database import DEMO_COUNTY
from tests.support.escalation import DAY, FROM, PHONE_SID, PHONE_TOKEN, Clock, messages, press, q, wristband_in

GRID_WORKER, GRID_WORKER_PHONE, GRID = "gw-001", "+12085550185", "dongguan-01-g1"  # 董思远
OFFICER, OFFICER_PHONE = "do-dongguan-1", "+12085550191"  # 胡洋, duty officer of dongguan
RULES = SignInRules()
IP = "198.51.100.7"
CODE = re.compile(r"登录验证码 (\d{6})")


@pytest.fixture
def conn(county_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(county_url, autocommit=True) as connection:
        yield connection


def _code_for(conn: psycopg.Connection[Any], phone: str = GRID_WORKER_PHONE, ip: str = IP) -> str:
    issued = issue_code(conn, phone, ip, DAY, RULES)
    assert issued is not None
    return issued.code


def _wrong(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


# --- names ---------------------------------------------------------------------------


def test_a_person_is_named_with_their_role() -> None:
    assert person_label("董思远", "grid_worker") == "董思远（网格员）"
    assert person_label("胡洋", "duty_officer") == "胡洋（值班员）"
    assert person_label("李明", "guardian") == "李明（监护人）"
    assert person_label("120调度台", "platform") == "120调度台"


# --- codes ---------------------------------------------------------------------------


def test_the_right_code_signs_in_once_and_is_stored_only_hashed(conn: psycopg.Connection[Any]) -> None:
    code = _code_for(conn)
    stored = q(conn.info.dsn, "SELECT code_salt, code_hash FROM sign_in_codes")
    assert len(stored) == 1
    assert code.encode() not in bytes(stored[0][0]) + bytes(stored[0][1])
    staff = sign_in_with_code(conn, GRID_WORKER_PHONE, code, IP, DAY + timedelta(seconds=30), RULES)
    assert (staff.id, staff.owner.name) == (GRID_WORKER, "董思远（网格员）")
    with pytest.raises(SignInRefused) as used:
        sign_in_with_code(conn, GRID_WORKER_PHONE, code, IP, DAY + timedelta(seconds=31), RULES)
    assert used.value.reason == SignInRefused.WRONG


def test_a_code_expires_by_the_clock_passed_in(conn: psycopg.Connection[Any]) -> None:
    code = _code_for(conn)
    with pytest.raises(SignInRefused) as late:
        sign_in_with_code(conn, GRID_WORKER_PHONE, code, IP, DAY + RULES.code_ttl, RULES)
    assert late.value.reason == SignInRefused.WRONG
    # A second before the end it still worked: the boundary is the TTL, not the call.
    again = issue_code(conn, GRID_WORKER_PHONE, IP, DAY + RULES.code_ttl, RULES)
    assert again is not None
    edge = DAY + 2 * RULES.code_ttl - timedelta(seconds=1)
    assert sign_in_with_code(conn, GRID_WORKER_PHONE, again.code, IP, edge, RULES).id == GRID_WORKER


def test_a_new_code_replaces_the_last_and_a_wrong_code_or_phone_is_refused(conn: psycopg.Connection[Any]) -> None:
    first = _code_for(conn)
    second = _code_for(conn)
    for phone, code in ((GRID_WORKER_PHONE, first), (GRID_WORKER_PHONE, _wrong(second)), (OFFICER_PHONE, second)):
        with pytest.raises(SignInRefused) as refused:
            sign_in_with_code(conn, phone, code, IP, DAY, RULES)
        assert refused.value.reason == SignInRefused.WRONG, (phone, code)
    assert sign_in_with_code(conn, GRID_WORKER_PHONE, second, IP, DAY, RULES).id == GRID_WORKER


def test_repeated_wrong_codes_lock_the_account_even_for_the_right_code(conn: psycopg.Connection[Any]) -> None:
    code = _code_for(conn)
    for second in range(RULES.max_failures):
        with pytest.raises(SignInRefused):
            sign_in_with_code(conn, GRID_WORKER_PHONE, _wrong(code), IP, DAY + timedelta(seconds=second), RULES)
    last = DAY + timedelta(seconds=RULES.max_failures - 1)
    assert locked_until(conn, GRID_WORKER, last, RULES) == last + RULES.lockout
    with pytest.raises(SignInRefused) as locked:
        sign_in_with_code(conn, GRID_WORKER_PHONE, code, IP, DAY + timedelta(seconds=10), RULES)
    assert locked.value.reason == SignInRefused.LOCKED
    with pytest.raises(SignInRefused) as no_code:
        issue_code(conn, GRID_WORKER_PHONE, IP, DAY + timedelta(seconds=11), RULES)
    assert no_code.value.reason == SignInRefused.LOCKED
    # Another person is not locked by it.
    assert locked_until(conn, OFFICER, last, RULES) is None
    # Once the lock-out has passed, a fresh code works (the old one has expired meanwhile).
    after = last + RULES.lockout
    fresh = issue_code(conn, GRID_WORKER_PHONE, "203.0.113.9", after, RULES)
    assert fresh is not None
    assert sign_in_with_code(conn, GRID_WORKER_PHONE, fresh.code, IP, after, RULES).id == GRID_WORKER


def test_codes_are_rate_limited_per_phone_and_per_address(conn: psycopg.Connection[Any]) -> None:
    for _ in range(RULES.codes_per_phone):
        assert issue_code(conn, GRID_WORKER_PHONE, IP, DAY, RULES) is not None
    with pytest.raises(SignInRefused) as per_phone:
        issue_code(conn, GRID_WORKER_PHONE, "203.0.113.1", DAY, RULES)
    assert per_phone.value.reason == SignInRefused.RATE_LIMITED
    # After the window the phone may ask again.
    assert issue_code(conn, GRID_WORKER_PHONE, IP, DAY + RULES.window + timedelta(seconds=1), RULES) is not None
    # One address asking for many numbers (nobody's included) is stopped too.
    spray = "192.0.2.50"
    for n in range(RULES.codes_per_ip):
        assert issue_code(conn, f"+1212555{n:04d}", spray, DAY, RULES) is None  # nobody's: no code, same answer
    with pytest.raises(SignInRefused) as per_address:
        issue_code(conn, OFFICER_PHONE, spray, DAY, RULES)
    assert per_address.value.reason == SignInRefused.RATE_LIMITED
    assert q(conn.info.dsn, "SELECT count(*) FROM sign_in_codes WHERE staff_id = %s", OFFICER) == [(0,)]


# --- passwords -----------------------------------------------------------------------


def test_an_operator_signs_in_with_a_password_stored_as_argon2(conn: psycopg.Connection[Any]) -> None:
    set_password(conn, OFFICER_PHONE, "correct horse battery", DAY)
    [(stored,)] = q(conn.info.dsn, "SELECT password_hash FROM staff_passwords WHERE staff_id = %s", OFFICER)
    assert stored.startswith("$argon2id$")
    assert "correct horse" not in stored
    assert sign_in_with_password(conn, OFFICER, "correct horse battery", IP, DAY, RULES).id == OFFICER
    assert sign_in_with_password(conn, OFFICER_PHONE, "correct horse battery", IP, DAY, RULES).id == OFFICER
    for who, password in ((OFFICER, "wrong horse battery"), ("nobody", "correct horse battery")):
        with pytest.raises(SignInRefused) as refused:
            sign_in_with_password(conn, who, password, IP, DAY, RULES)
        assert refused.value.reason == SignInRefused.WRONG
    with pytest.raises(ValueError, match="code sent to their phone"):
        set_password(conn, GRID_WORKER, "correct horse battery", DAY)
    with pytest.raises(ValueError, match="10 to 200"):
        set_password(conn, OFFICER, "short", DAY)


# --- tokens and sessions of people; deactivation ----------------------------------------


def test_a_staff_token_and_session_see_their_registry_areas_and_name_them(conn: psycopg.Connection[Any]) -> None:
    secret = create_token(conn, role=Role.GRID_WORKER, areas=[], label="", now=DAY, expires_at=None, staff=GRID_WORKER)
    token = authenticate(conn, secret, DAY)
    assert token is not None
    assert (token.role, token.areas, token.owner.key, token.owner.name) == (
        Role.GRID_WORKER, (GRID,), f"staff:{GRID_WORKER}", "董思远（网格员）"
    )
    officer = find_staff(conn, OFFICER)
    assert officer is not None
    session = authenticate_session(conn, open_staff_session(conn, officer, "password", DAY).secret, DAY)
    assert session is not None
    assert (session.token.id, session.token.role, session.token.areas) == (None, Role.OPERATOR, ("dongguan",))
    with pytest.raises(ValueError, match="role grid_worker"):
        create_token(conn, role=Role.ADMIN, areas=[], label="", now=DAY, expires_at=None, staff=GRID_WORKER)
    with pytest.raises(ValueError, match="registry"):
        create_token(conn, role=Role.GRID_WORKER, areas=[GRID], label="", now=DAY, expires_at=None, staff=GRID_WORKER)
    admin = create_token(conn, role=Role.ADMIN, areas=[], label="", now=DAY, expires_at=None, staff=OFFICER)
    assert authenticate(conn, admin, DAY) is not None


def test_deactivating_a_staff_member_in_the_registry_ends_their_sessions_and_tokens(
    conn: psycopg.Connection[Any],
) -> None:
    secret = create_token(conn, role=Role.GRID_WORKER, areas=[], label="", now=DAY, expires_at=None, staff=GRID_WORKER)
    member = find_staff(conn, GRID_WORKER)
    assert member is not None
    by_code = open_staff_session(conn, member, "code", DAY).secret
    other = create_token(conn, role=Role.OPERATOR, areas=[], label="值班", now=DAY, expires_at=None)
    assert authenticate(conn, secret, DAY) is not None
    assert authenticate_session(conn, by_code, DAY) is not None

    registry = parse_registry(DEMO_COUNTY)
    load_registry(conn, registry.model_copy(update={
        "staff": [s for s in registry.staff if s.id != GRID_WORKER],
        "rosters": [r for r in registry.rosters if r.staff != GRID_WORKER],
    }))

    assert authenticate(conn, secret, DAY) is None
    assert authenticate_session(conn, by_code, DAY) is None
    assert authenticate(conn, other, DAY) is not None, "only their credentials end"
    assert q(conn.info.dsn, "SELECT revoked_at IS NOT NULL FROM api_tokens WHERE staff_id = %s", GRID_WORKER) == [
        (True,)
    ]
    assert q(conn.info.dsn, "SELECT ended_at IS NOT NULL FROM api_sessions WHERE staff_id = %s", GRID_WORKER) == [
        (True,)
    ]
    assert q(conn.info.dsn, "SELECT action, subject FROM audit_log WHERE action = 'staff_deactivated'") == [
        ("staff_deactivated", f"staff:{GRID_WORKER}")
    ]
    # Listed again, they are active, but what ended stays ended; a code cannot be had by the old session.
    load_registry(conn, registry)
    assert authenticate(conn, secret, DAY) is None
    assert authenticate_session(conn, by_code, DAY) is None


def test_tokens_made_before_staff_accounts_became_named_integrations(database_url: str) -> None:
    """Migration 16 over a token of migration 15's shape: its label names its integration."""
    with psycopg.connect(database_url, autocommit=True) as db:
        [(label_rule,)] = db.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'api_tokens_one_owner'"
        ).fetchall()
        assert "staff_id IS NULL" in label_rule
        sql = (DEMO_COUNTY.parents[1] / "shouhu" / "migrations" / "0016_staff_accounts.sql").read_text()
        update = next(line for line in sql.splitlines() if line.startswith("UPDATE api_tokens SET integration"))
        db.execute("ALTER TABLE api_tokens DROP CONSTRAINT api_tokens_one_owner")
        db.execute(
            "INSERT INTO api_tokens (token_hash, role, label, created_at) VALUES"
            " ('\\x01', 'platform', '120调度台', now()), ('\\x02', 'operator', '', now())"
        )
        db.execute(update)
        rows = db.execute("SELECT id, role, integration FROM api_tokens ORDER BY id").fetchall()
        assert [(role, integration) for _id, role, integration in rows] == [
            ("platform", "120调度台"),
            ("operator", f"operator token {rows[1][0]}"),
        ]


# --- over HTTP: sign in by a code texted through the phone network --------------------------


@dataclass
class Site:
    client: TestClient
    clock: Clock
    phone: str
    db: str


@pytest.fixture
def site(county_url: str, phone_network: str) -> Iterator[Site]:
    clock = Clock(DAY)
    settings = Settings(
        database_url=county_url,
        twilio_account_sid=PHONE_SID,
        twilio_auth_token=PHONE_TOKEN,
        twilio_from=FROM,
        twilio_api_base=phone_network,
    )
    app = create_app(settings)
    app.dependency_overrides[get_now] = clock
    with TestClient(app) as client:
        yield Site(client, clock, phone_network, county_url)


def texted_code(phone_base: str, to: str) -> str:
    bodies = [m["body"] for m in messages(phone_base) if m["to"] == to and CODE.search(m["body"])]
    assert bodies, f"no sign-in code was texted to {to}"
    found = CODE.search(bodies[-1])
    assert found is not None
    return found.group(1)


def test_a_grid_worker_signs_in_by_a_texted_code_and_sees_their_grid(site: Site) -> None:
    asked = site.client.post("/api/v1/session/code", json={"phone": GRID_WORKER_PHONE})
    assert asked.status_code == 202, asked.text
    assert asked.json() == {"sent": True, "expires_in_s": 300}
    code = texted_code(site.phone, GRID_WORKER_PHONE)
    wrong = site.client.post("/api/v1/session/sign-in", json={"phone": GRID_WORKER_PHONE, "code": _wrong(code)})
    assert wrong.status_code == 401
    signed = site.client.post("/api/v1/session/sign-in", json={"phone": GRID_WORKER_PHONE, "code": code})
    assert signed.status_code == 201, signed.text
    body = signed.json()
    assert (body["role"], body["areas"], body["name"], body["staff_id"]) == (
        "grid_worker", [GRID], "董思远（网格员）", GRID_WORKER
    )
    assert signed.cookies[SESSION_COOKIE].startswith("shs_")
    areas = site.client.get("/api/v1/areas")  # with the session cookie the client now holds
    assert areas.status_code == 200
    assert {a["id"] for a in areas.json()["data"]} == {GRID}
    login = "SELECT actor, actor_name, detail->>'method' FROM audit_log WHERE action = 'login'"
    [(actor, name, method)] = q(site.db, login)
    assert (actor, name, method) == (f"staff:{GRID_WORKER}", "董思远（网格员）", "code")


def test_asking_for_a_code_answers_alike_for_any_number_and_is_limited(site: Site) -> None:
    stranger = site.client.post("/api/v1/session/code", json={"phone": "+12125550177"})
    assert stranger.status_code == 202
    assert stranger.json() == {"sent": True, "expires_in_s": 300}
    assert [m for m in messages(site.phone) if m["to"] == "+12125550177"] == []
    assert site.client.post("/api/v1/session/code", json={"phone": "not a phone"}).status_code == 422
    for _ in range(RULES.codes_per_phone):
        assert site.client.post("/api/v1/session/code", json={"phone": OFFICER_PHONE}).status_code == 202
    limited = site.client.post("/api/v1/session/code", json={"phone": OFFICER_PHONE})
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "900"
    assert len([m for m in messages(site.phone) if m["to"] == OFFICER_PHONE]) == RULES.codes_per_phone


def test_a_locked_out_sign_in_answers_429_and_both_secrets_are_exclusive(site: Site) -> None:
    assert site.client.post("/api/v1/session/code", json={"phone": GRID_WORKER_PHONE}).status_code == 202
    code = texted_code(site.phone, GRID_WORKER_PHONE)
    for _ in range(RULES.max_failures):
        site.clock.advance(1)
        wrong = {"phone": GRID_WORKER_PHONE, "code": _wrong(code)}
        assert site.client.post("/api/v1/session/sign-in", json=wrong).status_code == 401
    locked = site.client.post("/api/v1/session/sign-in", json={"phone": GRID_WORKER_PHONE, "code": code})
    assert locked.status_code == 429
    both = {"phone": GRID_WORKER_PHONE, "code": code, "password": "x"}
    assert site.client.post("/api/v1/session/sign-in", json=both).status_code == 422


def test_the_consoles_sign_in_forms_refuse_another_site(site: Site) -> None:
    evil = {"Origin": "https://evil.example"}
    asked = site.client.post("/console/login/code", data={"phone": GRID_WORKER_PHONE}, headers=evil)
    assert asked.status_code == 403
    assert [m for m in messages(site.phone) if m["to"] == GRID_WORKER_PHONE] == []
    same = {"Origin": str(site.client.base_url)}
    sent = site.client.post("/console/login/code", data={"phone": GRID_WORKER_PHONE}, headers=same,
                            follow_redirects=False)
    assert sent.status_code == 303
    code = texted_code(site.phone, GRID_WORKER_PHONE)
    form = {"phone": GRID_WORKER_PHONE, "code": code}
    assert site.client.post("/console/login/sign-in", data=form, headers=evil).status_code == 403
    signed = site.client.post("/console/login/sign-in", data=form, headers=same, follow_redirects=False)
    assert (signed.status_code, signed.headers["location"]) == (303, "/console")
    assert SESSION_COOKIE in signed.cookies


def test_old_codes_and_attempts_are_pruned(conn: psycopg.Connection[Any]) -> None:
    _code_for(conn)
    assert prune_sign_in(conn, DAY + timedelta(days=1)) == 0
    assert prune_sign_in(conn, DAY + timedelta(days=8)) == 2  # the code and its request
    assert q(conn.info.dsn, "SELECT count(*) FROM sign_in_codes") == [(0,)]


def test_no_sms_provider_means_no_code(county_url: str) -> None:
    with TestClient(create_app(Settings(database_url=county_url))) as client:
        answer = client.post("/api/v1/session/code", json={"phone": GRID_WORKER_PHONE})
    assert answer.status_code == 503
    assert "SHOUHU_TWILIO_" in answer.json()["detail"]


# --- one name for whoever acted ----------------------------------------------------------


@dataclass(frozen=True)
class Sos:
    incident: int
    code: str
    grid: str


def sos(stack: Stack) -> Sos:
    """An SOS from a resident whose grid has a grid worker on duty at DAY."""
    device, grid, _resident = wristband_in(stack.db, night_covered=False)
    incident = press(stack.db, device, DAY)
    return Sos(incident, q(stack.db, "SELECT code FROM incidents WHERE id = %s", incident)[0][0], grid)


def add_grid_worker(url: str, grid: str, phone: str = "+12125550142") -> str:
    """A second grid worker on duty in ``grid`` around the clock."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO staff (id, name, role, phone) VALUES ('gw-test', '赵网格', 'grid_worker', %s)", (phone,)
        )
        conn.execute("INSERT INTO staff_areas (staff_id, area_id) VALUES ('gw-test', %s)", (grid,))
        conn.execute(
            "INSERT INTO duty_shifts (staff_id, area_id, weekdays, start_time, end_time)"
            " VALUES ('gw-test', %s, '{1,2,3,4,5,6,7}', '00:00', '00:00')",
            (grid,),
        )
    return phone


def test_the_api_and_the_sms_notice_name_the_person_who_took_it(stack: Stack) -> None:
    case = sos(stack)
    other_phone = add_grid_worker(stack.db, case.grid)
    [(taker_id, taker_name)] = q(
        stack.db,
        "SELECT s.id, s.name FROM staff s JOIN staff_areas a ON a.staff_id = s.id"
        " WHERE a.area_id = %s AND s.role = 'grid_worker' AND s.id <> 'gw-test' ORDER BY s.id LIMIT 1",
        case.grid,
    )
    stack.router.run_due_steps()
    stack.send_due()
    with psycopg.connect(stack.db) as conn:
        secret = create_token(
            conn, role=Role.GRID_WORKER, areas=[], label="", now=stack.clock(), expires_at=None, staff=taker_id
        )
        conn.commit()
    named = f"{taker_name}（网格员）"
    headers = {"Authorization": f"Bearer {secret}"}
    reply = httpx.post(f"{stack.api}/api/v1/incidents/{case.incident}/ack", headers=headers, json={})
    assert reply.status_code == 200, reply.text
    assert (reply.json()["acknowledged_by"], reply.json()["acknowledged_by_id"]) == (named, f"staff:{taker_id}")
    listed = httpx.get(f"{stack.api}/api/v1/incidents", headers=headers).json()["data"]
    [row] = [i for i in listed if i["id"] == case.incident]
    assert (row["acknowledged_by"], row["acknowledged_by_id"]) == (named, f"staff:{taker_id}")
    detail = httpx.get(f"{stack.api}/api/v1/incidents/{case.incident}", headers=headers).json()
    [taken] = [e for e in detail["timeline"] if e["event"] == "acknowledged"]
    assert (taken["actor"], taken["actor_name"]) == (f"staff:{taker_id}", named)
    assert q(stack.db, "SELECT actor, actor_name FROM audit_log WHERE action = 'acknowledge'") == [
        (f"staff:{taker_id}", named)
    ]
    # The live feed names them by key only (its payloads carry no names).
    feed = "SELECT payload FROM live_events WHERE topic = 'incident' ORDER BY id DESC LIMIT 1"
    [(payload,)] = q(stack.db, feed)
    assert payload["acknowledged_by_id"] == f"staff:{taker_id}"
    assert named not in str(payload)
    stack.send_due()
    notices = [m for m in messages(stack.phone) if "接单处置" in m["body"]]
    assert [m["to"] for m in notices] == [other_phone]
    assert f"已由{named}接单处置" in notices[0]["body"]
    assert "token" not in notices[0]["body"]
    resolved = httpx.post(
        f"{stack.api}/api/v1/incidents/{case.incident}/resolve", headers=headers, json={"outcome": "visited_fine"}
    )
    assert resolved.status_code == 200, resolved.text
    detail = httpx.get(f"{stack.api}/api/v1/incidents/{case.incident}", headers=headers).json()
    [closed] = [e for e in detail["timeline"] if e["event"] == "resolved"]
    assert (closed["actor"], closed["actor_name"]) == (f"staff:{taker_id}", named)


def test_acknowledging_by_phone_names_the_person_the_same_way(stack: Stack) -> None:
    case = sos(stack)
    stack.router.run_due_steps()
    stack.send_due()
    [(phone, staff_id, name)] = q(
        stack.db,
        "SELECT a.address, s.id, s.name FROM notification_attempts a JOIN staff s ON s.id = a.recipient_id"
        " WHERE a.channel = 'sms' AND a.purpose = 'page' AND a.recipient_kind = 'staff' ORDER BY a.id LIMIT 1",
    )
    stack.text(phone, f"{case.code} 1")
    assert q(stack.db, "SELECT acknowledged_by, acknowledged_by_name FROM incidents WHERE id = %s", case.incident) == [
        (f"staff:{staff_id}", f"{name}（网格员）")
    ]


# --- the command line ----------------------------------------------------------------------


def _shouhu(url: str, cwd: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOUHU_")} | {"SHOUHU_DATABASE_URL": url}
    shouhu = Path(sys.executable).parent / "shouhu"
    return subprocess.run(
        [str(shouhu), *args], input=stdin, capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def test_the_command_line_makes_tokens_of_people_and_integrations_and_sets_passwords(
    conn: psycopg.Connection[Any], county_url: str, tmp_path: Path
) -> None:
    url = county_url
    person = _shouhu(url, tmp_path, "token", "create", "--staff", GRID_WORKER_PHONE)
    assert person.returncode == 0, person.stderr
    token = authenticate(conn, person.stdout.strip(), datetime.now(UTC))
    assert token is not None
    assert (token.role, token.owner.name) == (Role.GRID_WORKER, "董思远（网格员）")
    platform = _shouhu(url, tmp_path, "token", "create", "--integration", "120调度台", "--role", "platform")
    assert platform.returncode == 0, platform.stderr
    integration = authenticate(conn, platform.stdout.strip(), datetime.now(UTC))
    assert integration is not None
    assert (integration.owner.key, integration.owner.name) == ("integration:120调度台", "120调度台")
    both = _shouhu(url, tmp_path, "token", "create", "--staff", GRID_WORKER, "--integration", "x", "--role", "admin")
    assert (both.returncode, "not both" in both.stderr) == (2, True)
    nobody = _shouhu(url, tmp_path, "token", "create", "--staff", "gw-999")
    assert (nobody.returncode, "gw-999" in nobody.stderr) == (2, True)

    password = "correct horse battery\n"
    stored = _shouhu(url, tmp_path, "staff", "set-password", OFFICER, "--password-stdin", stdin=password)
    assert stored.returncode == 0, stored.stderr
    assert sign_in_with_password(conn, OFFICER_PHONE, "correct horse battery", IP, DAY, RULES).id == OFFICER
    refused = _shouhu(url, tmp_path, "staff", "set-password", GRID_WORKER, "--password-stdin", stdin="long enough pw\n")
    assert refused.returncode == 2
    assert "code sent to their phone" in refused.stderr


def test_mine_puts_the_grids_on_duty_now_first(site: Site) -> None:
    """宋晓红 covers two grids at night; by day she is on duty in the second one only."""
    worker, phone, first, second = "gw-004", "+12085550123", "dongguan-01-g1", "dongguan-01-g2"
    with psycopg.connect(site.db) as db:
        db.execute(
            "INSERT INTO duty_shifts (staff_id, area_id, weekdays, start_time, end_time)"
            " VALUES (%s, %s, '{1,2,3,4,5,6,7}', '09:00', '11:00')",
            (worker, second),
        )
    bands = {
        grid: q(site.db, "SELECT d.id FROM devices d JOIN residents r ON r.id = d.resident_id"
                " WHERE r.grid_id = %s ORDER BY d.id LIMIT 1", grid)[0][0]
        for grid in (first, second)
    }
    on_duty = press(site.db, bands[second], DAY - timedelta(minutes=5), msg_id="mine-on-duty")
    newer = press(site.db, bands[first], DAY - timedelta(minutes=1), msg_id="mine-newer")
    assert site.client.post("/api/v1/session/code", json={"phone": phone}).status_code == 202
    signed = site.client.post("/api/v1/session/sign-in", json={"phone": phone, "code": texted_code(site.phone, phone)})
    assert signed.status_code == 201, signed.text
    page = site.client.get("/console/grid")
    assert page.status_code == 200
    assert re.findall(r'data-incident="(\d+)"', page.text) == [str(on_duty), str(newer)]
    grids = page.text[page.text.index('id="my-grids"') :]
    assert grids.index("东关村第二网格") < grids.index("东关村第一网格")
    # Off duty in the evening: the newest first again.
    site.clock.advance(4 * 3600)
    listed = site.client.get("/console/grid/list")
    assert re.findall(r'data-incident="(\d+)"', listed.text) == [str(newer), str(on_duty)]
