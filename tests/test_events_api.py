"""The live feed and console sessions, over HTTP against uvicorn and the real database.

Every writer reaches the feed through the database's triggers: the tests open
incidents with the hub's ``record_alarm``, move devices with the hub's
``record_sightings`` and acknowledge through the API, then read the stream as a
console would, with httpx in a thread.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.rows import dict_row

from api import live
from api.deps import SESSION_COOKIE, get_now
from api.main import create_app
from api.routes.events import get_heartbeat_s
from devices.kinds import DeviceKind
from hub.liveness import LivenessDefaults, record_sightings
from hub.sightings import Sighting
from shouhu.sessions import SESSION_LIFETIME
from shouhu.settings import Settings
from shouhu.tokens import Role, create_token, revoke_token
from tests.escalation_support import DAY, Clock, press, q
from tests.services import serve_app

ARRIVAL_S = 1.0  # the promise: a change is on the console within a second
DEADLINE_S = 10.0  # how long a test waits for something that must happen
HEARTBEAT_S = 0.3  # the app's heartbeat here, so a revoked session ends a stream quickly
DEFAULTS = LivenessDefaults(interval_s=60, misses=3)
PRIVATE_KEYS = {"name", "phone", "medical_notes", "address", "lat", "lon", "note", "acknowledged_by"}


@dataclass(frozen=True)
class Api:
    url: str
    db: str
    clock: Clock

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")


@pytest.fixture
def api(county_url: str) -> Iterator[Api]:
    # The app's clock starts at the real time (tokens and sessions are stamped with
    # it) and moves only when a test moves it.
    clock = Clock(datetime.now(UTC))
    app = create_app(Settings(database_url=county_url))
    app.dependency_overrides[get_now] = clock
    app.dependency_overrides[get_heartbeat_s] = lambda: HEARTBEAT_S
    for url in serve_app(app):
        yield Api(url, county_url, clock)


def token(db: str, role: Role, areas: list[str] | None = None) -> str:
    with psycopg.connect(db) as conn:
        return create_token(conn, role=role, areas=areas or [], label=f"{role.value} console",
                            now=datetime.now(UTC), expires_at=None)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@dataclass(frozen=True)
class Event:
    id: int
    event: str
    data: dict[str, Any]


class Feed:
    """A console's EventSource: reads the stream in a thread and queues each event."""

    def __init__(self, api: Api, *, headers: dict[str, str] | None = None, params: dict[str, Any] | None = None,
                 cookies: dict[str, str] | None = None) -> None:
        self.status: int | None = None
        self.last_id = 0
        self.body = b""
        self.comments: list[str] = []
        self.events: queue.Queue[Event] = queue.Queue()
        self.started = threading.Event()
        self.ended = threading.Event()
        self._client = httpx.Client(base_url=api.url, cookies=cookies, timeout=httpx.Timeout(10.0, read=None))
        self._thread = threading.Thread(target=self._read, args=(headers or {}, params or {}), daemon=True)
        self._thread.start()
        if not self.started.wait(DEADLINE_S):
            raise AssertionError("the stream did not answer")

    def _read(self, headers: dict[str, str], params: dict[str, Any]) -> None:
        try:
            with self._client.stream("GET", "/api/v1/events", headers=headers, params=params) as response:
                self.status = response.status_code
                self.started.set()
                if response.status_code != 200:
                    self.body = response.read()
                    return
                assert response.headers["content-type"].startswith("text/event-stream")
                fields: dict[str, str] = {}
                for line in response.iter_lines():
                    if line.startswith(":"):
                        self.comments.append(line)
                    elif line:
                        name, _, value = line.partition(":")
                        fields[name] = value.removeprefix(" ")
                    elif "data" in fields:
                        event = Event(int(fields["id"]), fields.get("event", "message"), json.loads(fields["data"]))
                        self.events.put(event)
                        fields = {}
                    else:
                        fields = {}
        except (httpx.HTTPError, RuntimeError):
            pass  # closed by the test
        finally:
            self.started.set()
            self.ended.set()

    def next(self, within: float = DEADLINE_S) -> Event:
        try:
            event = self.events.get(timeout=within)
        except queue.Empty:
            raise AssertionError(f"no event within {within}s") from None
        self.last_id = event.id
        return event

    def take(self, count: int) -> list[Event]:
        return [self.next() for _ in range(count)]

    def close(self) -> None:
        self._client.close()
        self._thread.join(DEADLINE_S)


@pytest.fixture
def feeds() -> Iterator[list[Feed]]:
    opened: list[Feed] = []
    yield opened
    for feed in opened:
        feed.close()


def until(condition: Callable[[], bool], what: str) -> None:
    """Poll for ``condition`` until DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {DEADLINE_S}s")
        time.sleep(0.02)


def open_feed(feeds: list[Feed], api: Api, **kwargs: Any) -> Feed:
    feed = Feed(api, **kwargs)
    feeds.append(feed)
    assert feed.status == 200, feed.body
    return feed


def wristbands(db: str) -> list[tuple[str, str]]:
    """(wristband, grid) pairs, one per resident, in a stable order."""
    rows = q(db, """SELECT DISTINCT ON (r.id) d.id, r.grid_id FROM devices d JOIN residents r ON r.id = d.resident_id
                    WHERE d.kind = 'wristband' ORDER BY r.id, d.id""")
    return [(device, grid) for device, grid in rows]


def in_other_grids(db: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two wristbands in two different grids."""
    first, *rest = wristbands(db)
    second = next(band for band in rest if band[1] != first[1])
    return first, second


def sight(db: str, *sightings: Sighting) -> None:
    with psycopg.connect(db) as conn, conn.transaction():
        record_sightings(conn, sightings, DEFAULTS)


def seen(device: str, at: datetime, *, online: bool | None = None, reason: str | None = None) -> Sighting:
    kind = DeviceKind.CAMERA if device.startswith("cam-") else DeviceKind.WRISTBAND
    if online is False:
        return Sighting(device_id=device, kind=kind, received_at=at, refreshes=False,
                        reported_online=False, reported_reason=reason or "last_will")
    return Sighting(device_id=device, kind=kind, received_at=at, refreshes=True)


def camera_area(db: str, camera: str) -> str:
    area: str = q(db, "SELECT area_id FROM devices WHERE id = %s", camera)[0][0]
    return area


# --- the stream ----------------------------------------------------------------------


def test_an_sos_arrives_within_a_second_and_its_acknowledgement_follows(api: Api, feeds: list[Feed]) -> None:
    secret = token(api.db, Role.OPERATOR)
    feed = open_feed(feeds, api, headers=bearer(secret))
    (device, grid), _ = in_other_grids(api.db)

    pressed = time.monotonic()
    incident = press(api.db, device, DAY)
    opened = feed.next()
    assert time.monotonic() - pressed < ARRIVAL_S
    assert opened.event == "incident"
    assert opened.data["id"] == incident
    assert opened.data["change"] == "opened"
    assert (opened.data["kind"], opened.data["severity"], opened.data["state"]) == ("sos", "red", "open")
    assert opened.data["area_id"] == grid
    assert not PRIVATE_KEYS & opened.data.keys()

    answer = httpx.post(f"{api.url}/api/v1/incidents/{incident}/ack", headers=bearer(secret))
    assert answer.status_code == 200, answer.text
    acknowledged = feed.next()
    assert acknowledged.event == "incident"
    assert acknowledged.id > opened.id
    assert (acknowledged.data["id"], acknowledged.data["change"], acknowledged.data["state"]) == (
        incident, "updated", "acknowledged")
    assert acknowledged.data["acknowledged_at"] is not None
    assert not PRIVATE_KEYS & acknowledged.data.keys()
    until(lambda: bool(feed.comments), "a heartbeat comment")  # heartbeats keep the line alive


def test_a_device_going_offline_and_back_is_on_the_feed(api: Api, feeds: list[Feed]) -> None:
    feed = open_feed(feeds, api, headers=bearer(token(api.db, Role.OPERATOR)))
    t0 = datetime.now(UTC)
    sight(api.db, seen("cam-001", t0))
    sight(api.db, seen("cam-001", t0 + timedelta(seconds=5), online=False, reason="video_lost"))
    first, gone = feed.take(2)
    assert (first.event, first.data["device_id"], first.data["online"]) == ("device", "cam-001", True)
    assert (gone.event, gone.data["online"], gone.data["offline_reason"]) == ("device", False, "video_lost")
    assert gone.data["kind"] == "camera"
    assert gone.data["area_id"] == camera_area(api.db, "cam-001")
    # A message that changes nothing about `online` is not news.
    sight(api.db, seen("cam-001", t0 + timedelta(seconds=6), online=False, reason="video_lost"))
    sight(api.db, seen("cam-001", t0 + timedelta(seconds=7)))
    back = feed.next()
    assert back.data["online"] is True
    assert back.id > gone.id


def test_a_grid_worker_sees_only_their_grid(api: Api, feeds: list[Feed]) -> None:
    (mine, my_grid), (theirs, their_grid) = in_other_grids(api.db)
    worker = open_feed(feeds, api, headers=bearer(token(api.db, Role.GRID_WORKER, [my_grid])))
    neighbour = open_feed(feeds, api, headers=bearer(token(api.db, Role.GRID_WORKER, [their_grid])))
    t0 = datetime.now(UTC)

    # The other grid's SOS and wristband commit first: had they leaked, they would arrive first.
    other_incident = press(api.db, theirs, DAY)
    sight(api.db, seen(theirs, t0))
    own_incident = press(api.db, mine, DAY)
    sight(api.db, seen(mine, t0))

    incident, device = worker.take(2)
    assert (incident.event, incident.data["id"], incident.data["area_id"]) == ("incident", own_incident, my_grid)
    assert (device.event, device.data["device_id"], device.data["area_id"]) == ("device", mine, my_grid)
    assert [e.data.get("id") for e in neighbour.take(2)] == [other_incident, None]
    assert worker.events.empty()


def test_a_technician_sees_cameras_never_wristbands(api: Api, feeds: list[Feed]) -> None:
    technician = open_feed(feeds, api, headers=bearer(token(api.db, Role.TECHNICIAN)))
    (device, _grid), _ = in_other_grids(api.db)
    t0 = datetime.now(UTC)

    press(api.db, device, DAY)
    sight(api.db, seen(device, t0), seen(device, t0 + timedelta(seconds=1), online=False))
    sight(api.db, seen("cam-002", t0))

    first = technician.next()
    assert (first.event, first.data["device_id"], first.data["kind"]) == ("device", "cam-002", "camera")
    assert technician.events.empty()


def test_a_console_that_reconnects_gets_exactly_what_it_missed(api: Api, feeds: list[Feed]) -> None:
    secret = token(api.db, Role.OPERATOR)
    bands = wristbands(api.db)
    feed = open_feed(feeds, api, headers=bearer(secret))
    press(api.db, bands[0][0], DAY)
    seen_last = feed.next()
    feed.close()

    missed = [press(api.db, device, DAY) for device, _grid in bands[1:4]]

    resumed = open_feed(feeds, api, headers={**bearer(secret), "Last-Event-ID": str(seen_last.id)})
    events = resumed.take(3)
    assert [e.data["id"] for e in events] == missed
    ids = [e.id for e in events]
    assert ids == sorted(set(ids))
    assert seen_last.id not in ids
    # The stream then carries on live, without repeating anything.
    later = press(api.db, bands[4][0], DAY)
    assert resumed.next().data["id"] == later

    # A client that cannot set headers resumes with the query parameter; the header,
    # which a browser updates on each reconnect, wins over the URL.
    by_query = open_feed(feeds, api, headers=bearer(secret), params={"last_event_id": seen_last.id})
    assert [e.data["id"] for e in by_query.take(4)] == [*missed, later]
    both = open_feed(feeds, api, headers={**bearer(secret), "Last-Event-ID": str(ids[-1])},
                     params={"last_event_id": seen_last.id})
    assert both.next().data["id"] == later


def test_a_stale_or_unknown_last_event_id_is_answered_with_reset(api: Api, feeds: list[Feed]) -> None:
    secret = token(api.db, Role.OPERATOR)
    bands = wristbands(api.db)
    press(api.db, bands[0][0], DAY)
    press(api.db, bands[1][0], DAY)
    first_id = q(api.db, "SELECT min(id) FROM live_events")[0][0]
    with psycopg.connect(api.db, row_factory=dict_row) as conn:
        assert live.prune(conn, datetime.now(UTC) + live.RETENTION + timedelta(minutes=1)) == 2

    feed = open_feed(feeds, api, headers={**bearer(secret), "Last-Event-ID": str(first_id)})
    reset = feed.next()
    assert reset.event == "reset"
    assert "reload" in reset.data["reason"]
    # After the reset the stream goes on from the newest event.
    fresh = press(api.db, bands[2][0], DAY)
    following = feed.next()
    assert following.data["id"] == fresh
    assert following.id > reset.id

    # An id this database never issued (say, it was restored from a backup) resets too.
    assert open_feed(feeds, api, headers={**bearer(secret), "Last-Event-ID": "99999999"}).next().event == "reset"
    assert open_feed(feeds, api, headers={**bearer(secret), "Last-Event-ID": "garbage"}).next().event == "reset"


def test_streams_hold_no_connection_while_they_wait(api: Api, feeds: list[Feed]) -> None:
    # More streams than the API's pool has connections (8): each borrows one only to read.
    secret = token(api.db, Role.OPERATOR)
    crowd = [open_feed(feeds, api, headers=bearer(secret)) for _ in range(12)]
    (device, _grid), _ = in_other_grids(api.db)
    incident = press(api.db, device, DAY)
    assert {feed.next().data["id"] for feed in crowd} == {incident}
    assert httpx.get(f"{api.url}/api/v1/incidents", headers=bearer(secret)).status_code == 200
    # Consoles that go away leave nothing behind: the next ones are served as before.
    for feed in crowd:
        feed.close()
    again = open_feed(feeds, api, headers={**bearer(secret), "Last-Event-ID": str(crowd[0].last_id)})
    acknowledged = httpx.post(f"{api.url}/api/v1/incidents/{incident}/ack", headers=bearer(secret))
    assert acknowledged.status_code == 200
    assert again.next().data["state"] == "acknowledged"


def test_the_feed_refuses_a_missing_or_bad_credential(api: Api) -> None:
    assert Feed(api).status == 401
    assert Feed(api, headers=bearer("shh_not-a-token")).status == 401
    assert Feed(api, cookies={SESSION_COOKIE: "shs_not-a-session"}).status == 401


# --- the outbox itself ---------------------------------------------------------------


def test_ids_follow_commit_order_so_a_resume_cannot_skip_a_late_commit(county_url: str) -> None:
    bands = wristbands(county_url)
    first, second = press(county_url, bands[0][0], DAY), press(county_url, bands[1][0], DAY)
    with psycopg.connect(county_url) as slow, psycopg.connect(county_url) as quick:
        # `slow` changes its incident first but commits last.
        slow.execute("UPDATE incidents SET urgency = urgency + 1 WHERE id = %s", (first,))
        quick.execute("UPDATE incidents SET urgency = urgency + 1 WHERE id = %s", (second,))
        quick.commit()
        slow.commit()
    rows = q(county_url, "SELECT payload->>'id' FROM live_events WHERE payload->>'change' = 'updated' ORDER BY id")
    assert [int(r[0]) for r in rows] == [second, first]


def test_pruning_keeps_the_window_and_moves_the_horizon(county_url: str) -> None:
    bands = wristbands(county_url)
    for device, _grid in bands[:3]:
        press(county_url, device, DAY)
    with psycopg.connect(county_url, row_factory=dict_row, autocommit=True) as conn:
        ids = [r["id"] for r in conn.execute("SELECT id FROM live_events ORDER BY id")]
        conn.execute("UPDATE live_events SET at = now() - interval '25 hours' WHERE id <= %s", (ids[1],))
        assert live.prune(conn, datetime.now(UTC)) == 2
        assert live.prune(conn, datetime.now(UTC)) == 0
        assert [r["id"] for r in conn.execute("SELECT id FROM live_events")] == [ids[2]]
        everyone = live.Audience(None, ["sos"], [], [])
        assert live.read_after(conn, ids[0], everyone).reset
        kept = live.read_after(conn, ids[1], everyone)
        assert ([e.id for e in kept.events], kept.reset, kept.cursor) == ([ids[2]], False, ids[2])
        assert live.newest_id(conn) == ids[2]


# --- sessions ------------------------------------------------------------------------


def login(api: Api, secret: str) -> httpx.Response:
    return httpx.post(f"{api.url}/api/v1/session", json={"token": secret})


def test_login_sets_an_http_only_cookie_that_the_feed_accepts(api: Api, feeds: list[Feed]) -> None:
    (device, grid), _ = in_other_grids(api.db)
    answer = login(api, token(api.db, Role.GRID_WORKER, [grid]))
    assert answer.status_code == 201, answer.text
    assert (answer.json()["role"], answer.json()["areas"]) == ("grid_worker", [grid])
    cookie = answer.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "path", "samesite", "max-age"} <= attributes
    assert {"samesite=strict", "path=/"} <= {part.strip().lower() for part in cookie.split(";")}
    assert "secure" not in attributes  # plain http here; https sets Secure
    session = answer.cookies[SESSION_COOKIE]
    assert q(api.db, "SELECT action, role FROM audit_log") == [("login", "grid_worker")]

    feed = open_feed(feeds, api, cookies={SESSION_COOKIE: session})
    incident = press(api.db, device, DAY)
    assert feed.next().data["id"] == incident
    # The REST routes take the cookie too.
    listed = httpx.get(f"{api.url}/api/v1/incidents", cookies={SESSION_COOKIE: session})
    assert [i["id"] for i in listed.json()["data"]] == [incident]


def test_a_bad_token_cannot_log_in(api: Api) -> None:
    assert login(api, "shh_nope").status_code == 401
    assert httpx.post(f"{api.url}/api/v1/session", json={}).status_code == 422
    assert q(api.db, "SELECT count(*) FROM api_sessions") == [(0,)]


def test_logout_ends_the_session_and_its_stream(api: Api, feeds: list[Feed]) -> None:
    session = login(api, token(api.db, Role.OPERATOR)).cookies[SESSION_COOKIE]
    feed = open_feed(feeds, api, cookies={SESSION_COOKIE: session})

    answer = httpx.delete(f"{api.url}/api/v1/session", cookies={SESSION_COOKIE: session},
                          headers={"Origin": api.url})
    assert answer.status_code == 204
    assert f'{SESSION_COOKIE}=""' in answer.headers["set-cookie"] or "max-age=0" in answer.headers["set-cookie"].lower()
    assert [a for (a,) in q(api.db, "SELECT action FROM audit_log ORDER BY id")] == ["login", "logout"]
    assert feed.ended.wait(DEADLINE_S)  # the next heartbeat ends the open stream
    assert Feed(api, cookies={SESSION_COOKIE: session}).status == 401
    assert httpx.get(f"{api.url}/api/v1/areas", cookies={SESSION_COOKIE: session}).status_code == 401
    again = httpx.delete(f"{api.url}/api/v1/session", cookies={SESSION_COOKIE: session}, headers={"Origin": api.url})
    assert again.status_code == 401


def test_revoking_the_token_ends_its_sessions(api: Api, feeds: list[Feed]) -> None:
    secret = token(api.db, Role.OPERATOR)
    session = login(api, secret).cookies[SESSION_COOKIE]
    feed = open_feed(feeds, api, cookies={SESSION_COOKIE: session})
    with psycopg.connect(api.db) as conn:
        token_id = conn.execute("SELECT token_id FROM api_sessions").fetchone()
        assert token_id is not None
        assert revoke_token(conn, token_id[0], datetime.now(UTC))
    assert feed.ended.wait(DEADLINE_S)
    assert Feed(api, cookies={SESSION_COOKIE: session}).status == 401
    assert httpx.get(f"{api.url}/api/v1/areas", cookies={SESSION_COOKIE: session}).status_code == 401


def test_an_expired_session_is_refused(api: Api) -> None:
    session = login(api, token(api.db, Role.OPERATOR)).cookies[SESSION_COOKIE]
    assert httpx.get(f"{api.url}/api/v1/areas", cookies={SESSION_COOKIE: session}).status_code == 200
    api.clock.advance(SESSION_LIFETIME.total_seconds() - 1)
    assert httpx.get(f"{api.url}/api/v1/areas", cookies={SESSION_COOKIE: session}).status_code == 200
    api.clock.advance(2)
    refused = httpx.get(f"{api.url}/api/v1/areas", cookies={SESSION_COOKIE: session})
    assert refused.status_code == 401
    assert "log in again" in refused.json()["detail"]


def test_a_cookie_authenticated_post_must_come_from_this_site(api: Api) -> None:
    (device, _grid), _ = in_other_grids(api.db)
    incident = press(api.db, device, DAY)
    secret = token(api.db, Role.OPERATOR)
    session = login(api, secret).cookies[SESSION_COOKIE]
    ack = f"{api.url}/api/v1/incidents/{incident}/ack"

    for headers in ({}, {"Origin": "https://evil.example"}, {"Origin": "null"},
                    {"Referer": "https://evil.example/page"}):
        refused = httpx.post(ack, cookies={SESSION_COOKIE: session}, headers=headers)
        assert refused.status_code == 403, headers
        assert f"send an Origin (or Referer) header naming {api.host}" in refused.json()["detail"]
    assert q(api.db, "SELECT state FROM incidents WHERE id = %s", incident) == [("open",)]
    # Reads are safe: no Origin needed.
    assert httpx.get(f"{api.url}/api/v1/incidents", cookies={SESSION_COOKIE: session}).status_code == 200
    # The same site, by Origin or by Referer, is let through.
    answer = httpx.post(ack, cookies={SESSION_COOKIE: session}, headers={"Referer": f"{api.url}/console/"})
    assert answer.status_code == 200, answer.text
    # A browser never sends a bearer token on its own: no check.
    resolve = httpx.post(f"{api.url}/api/v1/incidents/{incident}/resolve", headers=bearer(secret),
                         json={"outcome": "false_alarm"})
    assert resolve.status_code == 200, resolve.text
    # Logging out is a cookie-authenticated DELETE: the same rule.
    assert httpx.delete(f"{api.url}/api/v1/session", cookies={SESSION_COOKIE: session}).status_code == 403
