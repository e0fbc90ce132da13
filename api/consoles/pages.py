"""The consoles: server-rendered pages for grid workers, technicians and the
governance centre (综治中心), in Chinese with English available.

A page is complete as served; ``static/console.js`` only keeps its live parts current
(the live feed, then a refetch of the page's ``data-fragment`` parts). Pages log in
with the same tokens as the API, exchanged for the session cookie; they read through
the same area scope and role sets as the REST routes, and act through the same
domain functions, so a console can do nothing the API would refuse. Forms post to
the console (no script needed); each post is checked as the API checks a
cookie-authenticated one (same origin), then redirects back (post/redirect/get).
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time, timedelta
from functools import partial
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError

from alerts import response
from alerts.acknowledge import Result, acknowledge, decline, resolve
from alerts.care import close_task, start_task
from alerts.supervise import incident_due_at, is_overdue, supervision_counts
from alerts.visits import VISIT_RATE_TARGET, parse_month, visit_rates
from alerts.visits import total as visit_total
from api import access, deps
from api.access import (
    ACKNOWLEDGERS,
    CAMERA_CARETAKERS,
    OVERVIEW_READERS,
    SUPERVISORS,
    may_see_incident,
    may_see_task,
    visible_incident_kinds,
)
from api.consoles import mine, queries
from api.consoles.i18n import Lang, maybe, word
from api.consoles.story import next_line, story
from api.consoles.uptime_chart import area_ratios, daily_ratios, svg_chart
from api.deps import (
    SESSION_COOKIE,
    ConnDep,
    Now,
    SettingsDep,
    identify,
    require_same_origin,
    token_actor,
    tuple_rows,
    write_audit,
)
from api.routes.sessions import (
    CodeCreate,
    SessionCreate,
    SignInCreate,
    create_session,
    create_sign_in_code,
    create_staff_session,
    delete_session,
)
from api.routes.supervision import supervise_incident_as, supervise_task_as
from devices.kinds import (
    REPAIR_OUTCOMES,
    VISIT_OUTCOMES,
    IncidentState,
    Outcome,
    Severity,
    TaskKind,
    TaskOutcome,
    TaskState,
)
from devices.reasons import offline_reason_text
from shouhu.accounts import OwnerKind
from shouhu.settings import Settings
from shouhu.tokens import Role, TokenIdentity

HERE = Path(__file__).resolve().parent
STATIC_DIR = HERE / "static"
LANG_COOKIE = "shouhu_lang"
HOME = {
    Role.GRID_WORKER: "/console/grid",
    Role.PLATFORM: "/console/grid",
    Role.TECHNICIAN: "/console/tech",
    Role.OPERATOR: "/console/overview",
    Role.ADMIN: "/console/overview",
}
NAV = {
    Role.GRID_WORKER: [("/console/grid", "grid_console")],
    Role.PLATFORM: [("/console/grid", "grid_console")],
    Role.TECHNICIAN: [("/console/tech", "tech_board")],
    Role.OPERATOR: [
        ("/console/overview", "overview"),
        ("/console/grid", "open_incidents"),
        ("/console/tech", "tech_board"),
    ],
    Role.ADMIN: [
        ("/console/overview", "overview"),
        ("/console/grid", "open_incidents"),
        ("/console/tech", "tech_board"),
    ],
}
OUTCOME_WORDS = {
    Outcome.VISITED_FINE: ("已上门，老人无恙", "Visited, resident fine"),
    Outcome.FALSE_ALARM: ("误报", "False alarm"),
    Outcome.SENT_TO_HOSPITAL: ("已送医", "Sent to hospital"),
    Outcome.HANDLED_BY_GUARDIAN: ("监护人已处置", "Handled by the guardian"),
    Outcome.EMERGENCY_SERVICES: ("120/110 已处置", "Handled by emergency services"),
    Outcome.OTHER: ("其他", "Other"),
}

router = APIRouter(prefix="/console", include_in_schema=False)


class LoginRequired(Exception):
    """No valid session: the console sends the browser to its login page."""


def _environment() -> Environment:
    return Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))


templates = Jinja2Templates(env=_environment())


def get_lang(request: Request) -> Lang:
    asked = request.query_params.get("lang") or request.cookies.get(LANG_COOKIE)
    return Lang.EN if asked == "en" else Lang.ZH


def console_token(request: Request, conn: ConnDep, now: Now) -> TokenIdentity:
    """The session's token; a missing or ended session sends the browser to log in."""
    try:
        return identify(conn, request, None, now)
    except HTTPException as exc:
        if exc.status_code == status.HTTP_401_UNAUTHORIZED:
            raise LoginRequired from exc
        raise


Viewer = Annotated[TokenIdentity, Depends(console_token)]
LangDep = Annotated[Lang, Depends(get_lang)]


def _zone(request: Request) -> ZoneInfo:
    """``SHOUHU_TIMEZONE``, as the uptime route has it (error pages are rendered outside a route)."""
    return deps.get_zone(deps.get_settings(request))


def _render(
    request: Request, name: str, lang: Lang, context: dict[str, Any], *, status_code: int = 200
) -> HTMLResponse:
    zone = _zone(request)
    me = context.get("token")
    page = templates.TemplateResponse(
        request,
        name,
        {
            "lang": lang.value,
            "w": lambda key: word(lang, key),
            "m": lambda key: maybe(lang, key),
            "local": lambda at: at.astimezone(zone).strftime("%m-%d %H:%M") if at else "",
            "clock": lambda at: at.astimezone(zone).strftime("%H:%M:%S"),  # the story's lines, seconds apart
            "pct": lambda ratio: "—" if ratio is None else f"{ratio * 100:.1f}%",
            "seconds": lambda s: "—" if s is None else f"{s:.0f} s",
            "duration": _duration,
            # A person's name already says their role ("董思远（网格员）"); an integration's does not.
            "me": {"label": context.get("label", ""), "role": "" if me.owner.kind is OwnerKind.STAFF else me.role.value}
            if me
            else None,
            "nav": NAV.get(me.role, []) if me else [],
            "here": request.url.path,
            **context,
        },
        status_code=status_code,
    )
    if "lang" in request.query_params:
        page.set_cookie(LANG_COOKIE, lang.value, max_age=365 * 86400, samesite="strict", path="/")
    return page


def _duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "—"
    if seconds < 60:  # a camera out for 40 s is not "0 min"
        return f"{max(int(seconds), 0)} s"
    minutes = int(seconds // 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


def _label(conn: ConnDep, token: TokenIdentity) -> str:
    """Who is signed in, as every timeline and notice names them: ``董思远（网格员）``."""
    return token.owner.name


def _scope(conn: ConnDep, token: TokenIdentity) -> list[str] | None:
    return deps.get_area_scope(conn, token).as_param()


# -- login ---------------------------------------------------------------------------


@router.get("/login")
def login_page(request: Request, lang: LangDep) -> HTMLResponse:
    sent = request.query_params.get("sent") == "1"
    phone = request.query_params.get("phone", "")[:32]
    return _render(request, "login.html", lang, {"error": None, "sent": sent, "phone": phone})


def _login_failed(request: Request, lang: Lang, error: str, exc: HTTPException | None, phone: str = "") -> Response:
    """The login page again, saying why (too many tries: a 429 that says so)."""
    code = exc.status_code if exc is not None else status.HTTP_401_UNAUTHORIZED
    if code == status.HTTP_429_TOO_MANY_REQUESTS:
        error = "sign_in_locked"
    elif code == status.HTTP_503_SERVICE_UNAVAILABLE:
        error = "code_not_sent"
    context = {"error": error, "sent": error == "code_failed", "phone": phone}
    return _render(request, "login.html", lang, context, status_code=code)


@router.post("/login")
def log_in(
    request: Request, conn: ConnDep, now: Now, lang: LangDep, token: Annotated[str, Form(max_length=200)]
) -> Response:
    """The token from the form becomes the session cookie, exactly as ``POST /api/v1/session`` does."""
    require_same_origin(request)  # no logging a victim's browser into someone else's session
    go = RedirectResponse("/console", status_code=status.HTTP_303_SEE_OTHER)
    try:
        create_session(SessionCreate(token=token.strip() or "-"), request, go, conn, now)
    except HTTPException:
        return _render(
            request, "login.html", lang, {"error": "login_failed", "sent": False, "phone": ""},
            status_code=status.HTTP_401_UNAUTHORIZED,
        )
    return go


@router.post("/login/code")
def send_sign_in_code(
    request: Request,
    conn: ConnDep,
    now: Now,
    lang: LangDep,
    settings: SettingsDep,
    phone: Annotated[str, Form(max_length=32)],
) -> Response:
    """Text a code to the phone, as ``POST /api/v1/session/code`` does, then show the code field."""
    require_same_origin(request)
    phone = phone.strip()
    try:
        create_sign_in_code(CodeCreate(phone=phone), request, conn, now, settings)
    except ValidationError:
        return _login_failed(request, lang, "phone_invalid", None, phone)
    except HTTPException as exc:
        return _login_failed(request, lang, "code_failed", exc, phone)
    query = urlencode({"sent": "1", "phone": phone})
    return RedirectResponse(f"/console/login?{query}", status_code=status.HTTP_303_SEE_OTHER)


@router.post("/login/sign-in")
def sign_in_from_console(
    request: Request,
    conn: ConnDep,
    now: Now,
    lang: LangDep,
    settings: SettingsDep,
    phone: Annotated[str, Form(max_length=100)],
    code: Annotated[str, Form(max_length=16)] = "",
    password: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """A staff member's phone and code (or an operator's password) become the session cookie,
    as ``POST /api/v1/session/sign-in`` does."""
    require_same_origin(request)
    go = RedirectResponse("/console", status_code=status.HTTP_303_SEE_OTHER)
    wrong = "code_failed" if code else "password_failed"
    try:
        body = SignInCreate(phone=phone.strip() or "-", code=code.strip() or None, password=password or None)
        create_staff_session(body, request, go, conn, now, settings)
    except ValidationError:
        return _login_failed(request, lang, wrong, None, phone.strip())
    except HTTPException as exc:
        return _login_failed(request, lang, wrong, exc, phone.strip())
    return go


@router.post("/logout")
def log_out(request: Request, conn: ConnDep, now: Now) -> Response:
    """End the session through the API's own logout, then back to the login page."""
    require_same_origin(request)
    try:
        delete_session(request, conn, now, request.cookies.get(SESSION_COOKIE))
    except HTTPException as exc:
        if exc.status_code != status.HTTP_401_UNAUTHORIZED:
            raise
    go = RedirectResponse("/console/login", status_code=status.HTTP_303_SEE_OTHER)
    go.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return go


@router.get("")
def home(token: Viewer) -> RedirectResponse:
    return RedirectResponse(HOME[token.role], status_code=status.HTTP_303_SEE_OTHER)


# -- the grid worker's console ---------------------------------------------------------


def _grid_context(request: Request, conn: ConnDep, token: TokenIdentity, now: datetime) -> dict[str, Any]:
    kinds = [k.value for k in visible_incident_kinds(token.role)]
    incidents = queries.open_incidents(conn, _scope(conn, token), kinds)
    settings = deps.get_settings(request)
    for incident in incidents:  # a red one's own due time, as its page shows it; a care one shows its task's
        if incident["severity"] == Severity.RED.value:
            incident["red_due_at"] = _red_due_at(incident, settings)
            incident["overdue"] = is_overdue(incident["red_due_at"], now)
    context: dict[str, Any] = {"incidents": incidents, "token": token, "grids": [], "sent_to_me": {}}
    if token.owner.kind is OwnerKind.STAFF:
        # "Mine": my grids, those I am on duty for now first, and what was sent to my phone.
        grids = mine.my_grids(conn, token.owner.id, now, _zone(request))
        on_duty = [g["area_id"] for g in grids if g["on_duty"]]
        context["grids"] = grids
        context["incidents"] = mine.on_duty_first(incidents, deps.area_subtree(conn, on_duty))
        context["sent_to_me"] = mine.attempts_to(conn, token.owner.id, [i["id"] for i in incidents])
        context["attempt_words"] = mine.ATTEMPT_WORDS
        context["channel_words"] = mine.CHANNEL_WORDS
    return context


@router.get("/grid")
def grid_console(request: Request, conn: ConnDep, token: Viewer, lang: LangDep, now: Now) -> HTMLResponse:
    """Open incidents and visits of my areas (on duty now first, with what was sent to me), live."""
    context = _grid_context(request, conn, token, now)
    return _render(request, "grid.html", lang, {**context, "label": _label(conn, token)})


@router.get("/grid/list")
def grid_list(request: Request, conn: ConnDep, token: Viewer, lang: LangDep, now: Now) -> HTMLResponse:
    return _render(request, "_incident_list.html", lang, _grid_context(request, conn, token, now))


def _visible_incident(conn: ConnDep, token: TokenIdentity, incident_id: int) -> dict[str, Any]:
    found = queries.incident(conn, incident_id)
    scope = deps.get_area_scope(conn, token)
    if found is None or not may_see_incident(token.role, scope, found["kind"], found["area_id"]):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "not found")
    return found


def _incident_context(
    conn: ConnDep, token: TokenIdentity, incident_id: int, lang: Lang, now: datetime
) -> dict[str, Any]:
    found = _visible_incident(conn, token, incident_id)
    resident = None
    guardians: list[dict[str, Any]] = []
    if found["resident_id"] and token.role in access.RESIDENT_READERS:
        resident = {
            "name": found["resident_name"],
            "address": found["resident_address"],
            "phone": found["resident_phone"],
            # Health data only for the roles the API shows it to (PIPL).
            "medical_notes": found["medical_notes"] if token.role in access.SENSITIVE_READERS else None,
        }
        guardians = queries.guardians(conn, found["resident_id"])
        with conn.transaction():
            write_audit(conn, token, now, "read_resident", f"resident:{found['resident_id']}", {"via": "console"})
    zh = lang is Lang.ZH
    outcomes = [(o.value, words[0] if zh else words[1]) for o, words in OUTCOME_WORDS.items()]
    attempts = queries.attempts(conn, incident_id)
    return {
        "i": found,
        "resident": resident,
        "guardians": guardians,
        "story": story(lang, queries.timeline(conn, incident_id), attempts, dict(outcomes)),
        "paged": bool(attempts),
        "next": next_line(lang, upcoming) if (upcoming := queries.next_step(conn, incident_id)) else None,
        "outcome": dict(outcomes).get(found["outcome"] or "", found["outcome"]),
        "can_act": token.role in ACKNOWLEDGERS and found["severity"] == "red",
        "outcomes": outcomes,
        "token": token,
    }


def _red_due_at(found: dict[str, Any], settings: Settings) -> datetime | None:
    """A red incident's own due time (to be taken, then to be resolved), for its page and the
    grid list alike; a care incident's due time is its task's (shown with the task)."""
    return incident_due_at(
        Severity(found["severity"]),
        IncidentState(found["state"]),
        found["opened_at"],
        found["acknowledged_at"],
        settings.ack_timeout_s if found["first_wait_s"] is None else int(found["first_wait_s"]),
        settings.resolve_timeout_s,
        None,
    )


def _due(found: dict[str, Any], token: TokenIdentity, settings: Settings, now: datetime) -> dict[str, Any]:
    """The incident's due time, whether it is overdue, and whether this viewer may supervise it (督办)."""
    due_at = _red_due_at(found, settings)
    overdue = is_overdue(due_at, now)
    return {"due_at": due_at, "overdue": overdue, "can_supervise": overdue and token.role in SUPERVISORS}


@router.get("/incidents/{incident_id}")
def incident_page(
    request: Request, conn: ConnDep, token: Viewer, lang: LangDep, now: Now, settings: SettingsDep, incident_id: int
) -> Response:
    found = _visible_incident(conn, token, incident_id)  # out of scope: 404 before anything is told
    if found["task_id"] is not None and found["severity"] != "red":  # a red one's task is its follow-up visit
        return RedirectResponse(f"/console/tasks/{found['task_id']}", status_code=status.HTTP_303_SEE_OTHER)
    context = _incident_context(conn, token, incident_id, lang, now)
    due = _due(context["i"], token, settings, now)
    return _render(request, "incident.html", lang, {**context, **due, "label": _label(conn, token)})


@router.get("/incidents/{incident_id}/body")
def incident_body(
    request: Request, conn: ConnDep, token: Viewer, lang: LangDep, now: Now, settings: SettingsDep, incident_id: int
) -> HTMLResponse:
    context = _incident_context(conn, token, incident_id, lang, now)
    return _render(request, "_incident_body.html", lang, {**context, **_due(context["i"], token, settings, now)})


@router.post("/incidents/{incident_id}/supervise")
def supervise_from_console(
    request: Request, conn: ConnDep, token: Viewer, now: Now, settings: SettingsDep, incident_id: int
) -> Response:
    """督办: the REST route's rules and answers (403, 409 as a page), then back to the incident."""
    require_same_origin(request)
    scope = deps.get_area_scope(conn, token)
    supervise_incident_as(conn, token, scope, settings, incident_id, now, "console")
    return RedirectResponse(f"/console/incidents/{incident_id}", status_code=status.HTTP_303_SEE_OTHER)


def _act(
    request: Request, conn: ConnDep, token: TokenIdentity, incident_id: int, action: str, run: Any, now: datetime
) -> Response:
    require_same_origin(request)
    found = _visible_incident(conn, token, incident_id)
    if token.role not in ACKNOWLEDGERS or found["severity"] != "red":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "forbidden")
    actor = token_actor(conn, token)
    with conn.transaction():
        with tuple_rows(conn) as plain:
            result: Result = run(plain, actor)
        write_audit(conn, token, now, action, f"incident:{incident_id}", {"result": result.value, "via": "console"})
    return RedirectResponse(f"/console/incidents/{incident_id}", status_code=status.HTTP_303_SEE_OTHER)


@router.post("/incidents/{incident_id}/ack")
def acknowledge_from_console(
    request: Request, conn: ConnDep, token: Viewer, now: Now, settings: SettingsDep, incident_id: int
) -> Response:
    timeout = settings.resolve_timeout_s
    return _act(
        request,
        conn,
        token,
        incident_id,
        "acknowledge",
        lambda plain, actor: acknowledge(plain, incident_id, actor, "console", now, resolve_timeout_s=timeout),
        now,
    )


@router.post("/incidents/{incident_id}/decline")
def decline_from_console(request: Request, conn: ConnDep, token: Viewer, now: Now, incident_id: int) -> Response:
    return _act(
        request,
        conn,
        token,
        incident_id,
        "decline",
        lambda plain, actor: decline(plain, incident_id, actor, "console", now),
        now,
    )


@router.post("/incidents/{incident_id}/resolve")
def resolve_from_console(
    request: Request,
    conn: ConnDep,
    token: Viewer,
    now: Now,
    incident_id: int,
    outcome: Annotated[Outcome, Form()],
    note: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    return _act(
        request,
        conn,
        token,
        incident_id,
        "resolve",
        lambda plain, actor: resolve(plain, incident_id, outcome, note, actor, now),
        now,
    )


# -- tasks (visits and repair orders) --------------------------------------------------


def _visible_task(conn: ConnDep, token: TokenIdentity, task_id: int) -> dict[str, Any]:
    found = queries.task(conn, task_id)
    scope = deps.get_area_scope(conn, token)
    if found is None or not may_see_task(token.role, scope, found["kind"], found["area_id"]):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "not found")
    return found


@router.get("/tasks/{task_id}")
def task_page(request: Request, conn: ConnDep, token: Viewer, lang: LangDep, now: Now, task_id: int) -> HTMLResponse:
    found = _visible_task(conn, token, task_id)
    if found["resident_id"]:
        # A visit shows whose band it is and where they live: a read of personal data.
        with conn.transaction():
            write_audit(conn, token, now, "read_resident", f"resident:{found['resident_id']}", {"via": "console"})
    outcomes = VISIT_OUTCOMES if found["kind"] == TaskKind.VISIT.value else REPAIR_OUTCOMES
    overdue = found["state"] != TaskState.CLOSED.value and is_overdue(found["due_at"], now)
    return _render(
        request,
        "task.html",
        lang,
        {
            "t": found,
            "story": story(
                lang, queries.timeline(conn, found["incident_id"]), queries.attempts(conn, found["incident_id"]), {}
            ),
            "outcomes": sorted(o.value for o in outcomes),
            "overdue": overdue,
            "can_supervise": overdue and token.role in SUPERVISORS,
            "token": token,
            "label": _label(conn, token),
        },
    )


def _task_action(
    request: Request, conn: ConnDep, token: TokenIdentity, task_id: int, action: str, run: Any, now: datetime
) -> Response:
    require_same_origin(request)
    _visible_task(conn, token, task_id)
    actor = token_actor(conn, token)
    with conn.transaction():
        with tuple_rows(conn) as plain:
            try:
                result: Result = run(plain, actor)
            except ValueError as exc:
                raise HTTPException(422, str(exc)) from exc
        write_audit(conn, token, now, action, f"task:{task_id}", {"result": result.value, "via": "console"})
    return RedirectResponse(f"/console/tasks/{task_id}", status_code=status.HTTP_303_SEE_OTHER)


@router.post("/tasks/{task_id}/supervise")
def supervise_task_from_console(
    request: Request, conn: ConnDep, token: Viewer, now: Now, settings: SettingsDep, task_id: int
) -> Response:
    """督办 a visit or repair order: one level up, as the REST route does."""
    require_same_origin(request)
    scope = deps.get_area_scope(conn, token)
    supervise_task_as(conn, token, scope, settings, task_id, now, "console")
    return RedirectResponse(f"/console/tasks/{task_id}", status_code=status.HTTP_303_SEE_OTHER)


@router.post("/tasks/{task_id}/start")
def start_from_console(request: Request, conn: ConnDep, token: Viewer, now: Now, task_id: int) -> Response:
    return _task_action(
        request, conn, token, task_id, "task_start", lambda plain, actor: start_task(plain, task_id, actor, now), now
    )


@router.post("/tasks/{task_id}/close")
def close_from_console(
    request: Request,
    conn: ConnDep,
    token: Viewer,
    now: Now,
    task_id: int,
    outcome: Annotated[TaskOutcome, Form()],
    note: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    return _task_action(
        request,
        conn,
        token,
        task_id,
        "task_close",
        lambda plain, actor: close_task(plain, task_id, outcome, note, actor, now),
        now,
    )


# -- the technician's board and the governance overview ---------------------------------


def _period(request: Request, now: datetime, zone: ZoneInfo, default_days: int) -> tuple[date, date]:
    """[from, to] as local days from ``?from=&to=`` (inclusive), the last ``default_days`` days by default."""
    today = now.astimezone(zone).date()
    try:
        start = date.fromisoformat(request.query_params["from"]) if request.query_params.get("from") else None
        end = date.fromisoformat(request.query_params["to"]) if request.query_params.get("to") else None
    except ValueError as exc:
        raise HTTPException(422, "the period's from and to must be dates (YYYY-MM-DD)") from exc
    end = end or today
    start = start or end - timedelta(days=default_days - 1)
    if start > end or (end - start).days > 366:
        raise HTTPException(422, "the period must run forwards and be at most a year")
    return start, end


def _instant(day: date, zone: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), zone).astimezone(UTC)


def _tech_context(request: Request, conn: ConnDep, token: TokenIdentity, now: datetime) -> dict[str, Any]:
    if token.role not in CAMERA_CARETAKERS:  # the uptime route's gate, the same set
        raise HTTPException(status.HTTP_403_FORBIDDEN, "forbidden")
    zone = _zone(request)
    start, end = _period(request, now, zone, 7)
    scope = _scope(conn, token)
    today = now.astimezone(zone).date()
    by_area_today = area_ratios(conn, scope, _instant(today, zone), now, zone)
    by_area_period = area_ratios(
        conn, scope, _instant(start, zone), min(now, _instant(end + timedelta(days=1), zone)), zone
    )
    series = daily_ratios(conn, scope, start, end, zone, now)
    return {
        "areas": queries.cameras_by_area(conn, scope, now),
        "orders": queries.open_orders(conn, scope),
        "today": by_area_today,
        "period": by_area_period,
        "chart": svg_chart(series, title="在线率" if get_lang(request) is Lang.ZH else "Online ratio"),
        "period_from": start.isoformat(),
        "period_to": end.isoformat(),
        "token": token,
        "reason": partial(offline_reason_text, english=get_lang(request) is Lang.EN),
    }


@router.get("/tech")
def tech_board(request: Request, conn: ConnDep, token: Viewer, lang: LangDep, now: Now) -> HTMLResponse:
    """Cameras by area with their online ratio, the offline list, open orders and the trend."""
    return _render(
        request, "tech.html", lang, {**_tech_context(request, conn, token, now), "label": _label(conn, token)}
    )


@router.get("/tech/body")
def tech_body(request: Request, conn: ConnDep, token: Viewer, lang: LangDep, now: Now) -> HTMLResponse:
    return _render(request, "_tech_body.html", lang, _tech_context(request, conn, token, now))


def _overview_context(request: Request, conn: ConnDep, token: TokenIdentity, now: datetime) -> dict[str, Any]:
    if token.role not in OVERVIEW_READERS:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "forbidden")
    zone = _zone(request)
    start, end = _period(request, now, zone, 30)
    since, until = _instant(start, zone), _instant(end + timedelta(days=1), zone)
    scope = _scope(conn, token)
    return {
        "severity": queries.incidents_by_severity_and_area(conn, scope, since, until),
        "reached_platform": queries.reached_platform(conn, scope, since, until),
        **_response_figures(conn, scope, since, until, now),
        "uncovered": queries.uncovered_tonight(conn, scope, now, zone),
        "offline": queries.devices_offline_by_area(conn, scope),
        "visits": _visit_rates(conn, scope, end, now, zone),
        "period_from": start.isoformat(),
        "period_to": end.isoformat(),
        # The exports take [from, to) and a date means its local midnight: the day after the last one shown.
        "export_to": (end + timedelta(days=1)).isoformat(),
        "token": token,
        "reason": partial(offline_reason_text, english=get_lang(request) is Lang.EN),
    }


def _response_figures(
    conn: ConnDep, scope: list[str] | None, since: datetime, until: datetime, now: datetime
) -> dict[str, Any]:
    """The response figures against the telecare targets, and supervisions: alerts/ computes both, as for REST."""
    with tuple_rows(conn) as plain:
        return {
            "figures": response.figures(response.read_alarms(plain, since, until, scope), now),
            "supervised": supervision_counts(plain, scope, since, until),
        }
def _visit_rates(conn: ConnDep, scope: list[str] | None, day: date, now: datetime, zone: ZoneInfo) -> dict[str, Any]:
    """The visit rate of the month the period ends in (the REST report's figures), by grid."""
    month = parse_month(f"{day:%Y-%m}", zone)
    rates = visit_rates(conn, month, now, scope=scope)
    return {"month": month.key, "areas": rates, "total": visit_total(rates), "target": VISIT_RATE_TARGET}


@router.get("/overview")
def overview(request: Request, conn: ConnDep, token: Viewer, lang: LangDep, now: Now) -> HTMLResponse:
    """Incidents by 红黄蓝 and area, SOS response against the 60 s / 180 s targets, tonight's gaps, devices offline."""
    return _render(
        request, "overview.html", lang, {**_overview_context(request, conn, token, now), "label": _label(conn, token)}
    )


@router.get("/overview/body")
def overview_body(request: Request, conn: ConnDep, token: Viewer, lang: LangDep, now: Now) -> HTMLResponse:
    return _render(request, "_overview_body.html", lang, _overview_context(request, conn, token, now))


def error_page(request: Request, status_code: int) -> HTMLResponse:
    """A console's 403/404/422 as a page, not JSON (the pages are for people)."""
    lang = get_lang(request)
    message = word(lang, "not_found") if status_code == status.HTTP_404_NOT_FOUND else str(status_code)
    return _render(
        request, "error.html", lang, {"status_code": status_code, "message": message}, status_code=status_code
    )
