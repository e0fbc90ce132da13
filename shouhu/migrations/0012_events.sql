-- The live feed (issue #7): an outbox of changes that `GET /api/v1/events` streams,
-- and the consoles' login sessions.
--
-- The outbox is filled by triggers, so every writer (hub, router, care sweeper, API)
-- is covered without knowing about it. The triggers are deferred to commit and take
-- one advisory lock before they number their rows: ids are therefore handed out in
-- commit order, and a reader that has seen id N will never later see a row below N
-- appear. Without that, two writers committing out of order would leave a hole that
-- a resuming console (Last-Event-ID) silently skips. The lock is held only from the
-- deferred triggers to the commit, with no statement of the writer left to run, so
-- it cannot take part in a deadlock; PostgreSQL's own NOTIFY lock, taken right after
-- it, already serialises these commits.
--
-- Payloads carry ids, kinds, states, areas and times only: no names, phone numbers,
-- notes or locations (PIPL); a console reads those through the audited REST routes.

CREATE TABLE live_events (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    topic    text NOT NULL CHECK (topic IN ('incident', 'device', 'task')),
    -- The incident kind, device kind or task kind: what a role may see is decided by it.
    kind     text NOT NULL,
    -- The area that scopes it (an incident's area, a camera's area, a wristband's
    -- grid, a task's area); NULL only for an unregistered wristband's SOS, which
    -- county-wide tokens alone see. No foreign key: an old event outlives nothing.
    area_id  text,
    payload  jsonb NOT NULL
);
CREATE INDEX live_events_at_idx ON live_events (at);

-- The newest id pruned so far (api/live.py keeps a retention window): a console
-- resuming from an id below it has missed events, and is told to reload instead.
CREATE TABLE live_events_horizon (
    only_row        boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    pruned_through  bigint NOT NULL DEFAULT 0
);
INSERT INTO live_events_horizon DEFAULT VALUES;

CREATE FUNCTION live_event_emit(p_topic text, p_kind text, p_area text, p_payload jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    -- 0x53484F5548550E01: numbers the outbox in commit order (see the header).
    PERFORM pg_advisory_xact_lock(6001133731175534081);
    INSERT INTO live_events (topic, kind, area_id, payload) VALUES (p_topic, p_kind, p_area, p_payload);
    -- One wake-up per transaction (identical notifications collapse); listeners read
    -- the table, so the notification carries nothing.
    PERFORM pg_notify('shouhu_live_events', '');
END
$$;

CREATE FUNCTION live_events_incident() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM live_event_emit('incident', NEW.kind, NEW.area_id, jsonb_build_object(
        'change', CASE TG_OP WHEN 'INSERT' THEN 'opened' ELSE 'updated' END,
        'id', NEW.id, 'code', NEW.code, 'kind', NEW.kind, 'severity', NEW.severity,
        'state', NEW.state, 'urgency', NEW.urgency, 'area_id', NEW.area_id,
        'resident_id', NEW.resident_id, 'device_id', NEW.device_id,
        'opened_at', NEW.opened_at, 'acknowledged_at', NEW.acknowledged_at,
        'resolved_at', NEW.resolved_at, 'outcome', NEW.outcome));
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER live_events_incident_opened
    AFTER INSERT ON incidents DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION live_events_incident();
CREATE CONSTRAINT TRIGGER live_events_incident_changed
    AFTER UPDATE ON incidents DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.urgency IS DISTINCT FROM NEW.urgency
          OR OLD.acknowledged_by IS DISTINCT FROM NEW.acknowledged_by
          OR OLD.outcome IS DISTINCT FROM NEW.outcome)
    EXECUTE FUNCTION live_events_incident();

CREATE FUNCTION live_events_device() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    device_kind text;
    scope_area  text;
BEGIN
    -- A wristband is scoped by its wearer's grid, a camera by where it is mounted.
    SELECT d.kind, CASE WHEN d.kind = 'wristband' THEN r.grid_id ELSE d.area_id END
      INTO device_kind, scope_area
      FROM devices d LEFT JOIN residents r ON r.id = d.resident_id
     WHERE d.id = NEW.device_id;
    PERFORM live_event_emit('device', device_kind, scope_area, jsonb_build_object(
        'device_id', NEW.device_id, 'kind', device_kind, 'online', NEW.online,
        'offline_reason', NEW.offline_reason, 'last_seen', NEW.last_seen,
        'state_at', NEW.state_at, 'area_id', scope_area));
    RETURN NULL;
END
$$;

-- device_state is written on every message; the WHEN clauses keep the feed (and the
-- lock) to the rare change of `online`. The hub first inserts a bare row (online
-- NULL) and then updates it, so a first sighting arrives through the update.
CREATE CONSTRAINT TRIGGER live_events_device_seen
    AFTER INSERT ON device_state DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.online IS NOT NULL)
    EXECUTE FUNCTION live_events_device();
CREATE CONSTRAINT TRIGGER live_events_device_changed
    AFTER UPDATE ON device_state DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (OLD.online IS DISTINCT FROM NEW.online)
    EXECUTE FUNCTION live_events_device();

CREATE FUNCTION live_events_task() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM live_event_emit('task', NEW.kind, NEW.area_id, jsonb_build_object(
        'change', CASE TG_OP WHEN 'INSERT' THEN 'opened' ELSE 'updated' END,
        'id', NEW.id, 'incident_id', NEW.incident_id, 'kind', NEW.kind,
        'device_id', NEW.device_id, 'resident_id', NEW.resident_id, 'area_id', NEW.area_id,
        'owner_area_id', NEW.owner_area_id, 'level', NEW.level, 'reason', NEW.reason,
        'state', NEW.state, 'opened_at', NEW.opened_at, 'due_at', NEW.due_at,
        'started_at', NEW.started_at, 'recovered_at', NEW.recovered_at,
        'closed_at', NEW.closed_at, 'outcome', NEW.outcome));
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER live_events_task_opened
    AFTER INSERT ON care_tasks DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION live_events_task();
CREATE CONSTRAINT TRIGGER live_events_task_changed
    AFTER UPDATE ON care_tasks DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.owner_area_id IS DISTINCT FROM NEW.owner_area_id
          OR OLD.level IS DISTINCT FROM NEW.level)
    EXECUTE FUNCTION live_events_task();

-- Console sessions (the session cookie): the secret is 256 random bits stored as
-- SHA-256, like api_tokens. Bound to the token that logged in, so revoking or
-- expiring the token ends its sessions too.
CREATE TABLE api_sessions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_hash  bytea NOT NULL UNIQUE,
    token_id      bigint NOT NULL REFERENCES api_tokens (id),
    created_at    timestamptz NOT NULL,
    expires_at    timestamptz NOT NULL,
    ended_at      timestamptz,
    CHECK (expires_at > created_at)
);
CREATE INDEX api_sessions_token_idx ON api_sessions (token_id);
CREATE INDEX api_sessions_expires_idx ON api_sessions (expires_at);
