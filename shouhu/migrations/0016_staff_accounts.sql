-- Staff accounts (issue 15): staff sign in as themselves, and every credential
-- belongs to a person or to a named integration. Owned by shouhu/accounts.py
-- (codes, passwords, sign-in attempts), shouhu/tokens.py and shouhu/sessions.py.

-- A token belongs to a staff member of the registry or to a named integration
-- (the emergency platform, a script). Tokens made before this migration named
-- nobody: each becomes its label's integration (or "<role> token <id>"), so it
-- keeps its role, areas and name; an admin re-issues tokens to people.
ALTER TABLE api_tokens
    ADD COLUMN staff_id    text REFERENCES staff (id),
    ADD COLUMN integration text;
UPDATE api_tokens SET integration = coalesce(nullif(label, ''), role || ' token ' || id);
ALTER TABLE api_tokens ADD CONSTRAINT api_tokens_one_owner CHECK ((staff_id IS NULL) <> (integration IS NULL));
CREATE INDEX api_tokens_staff_idx ON api_tokens (staff_id) WHERE staff_id IS NOT NULL;

-- A console session is opened by a token or by a staff member's code or password.
ALTER TABLE api_sessions
    ALTER COLUMN token_id DROP NOT NULL,
    ADD COLUMN staff_id text REFERENCES staff (id),
    ADD COLUMN method   text NOT NULL DEFAULT 'token' CHECK (method IN ('token', 'code', 'password')),
    ADD CONSTRAINT api_sessions_opened_by CHECK ((token_id IS NULL) <> (staff_id IS NULL));
CREATE INDEX api_sessions_staff_idx ON api_sessions (staff_id) WHERE staff_id IS NOT NULL;

-- Who did it, by name, as the audit log's readers need it.
ALTER TABLE audit_log
    ADD COLUMN actor      text,
    ADD COLUMN actor_name text;

-- An operator's second way in: an argon2id hash (the parameters live in the hash).
CREATE TABLE staff_passwords (
    staff_id       text PRIMARY KEY REFERENCES staff (id),
    password_hash  text NOT NULL,
    set_at         timestamptz NOT NULL
);

-- One-time sign-in codes sent by SMS. The code is stored as HMAC-SHA-256 under a
-- salt of its own; it is short, so what protects it is its expiry, its single use
-- and the limit on wrong tries, not the hash.
CREATE TABLE sign_in_codes (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    staff_id    text NOT NULL REFERENCES staff (id),
    code_salt   bytea NOT NULL,
    code_hash   bytea NOT NULL,
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    CHECK (expires_at > created_at)
);
CREATE INDEX sign_in_codes_staff_idx ON sign_in_codes (staff_id, created_at DESC);

-- Every code asked for and every sign-in tried, for the rate limits (per phone, per
-- address) and the lock-out; staff_id is NULL for a phone that is nobody's.
CREATE TABLE sign_in_attempts (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL,
    phone     text NOT NULL,
    staff_id  text,
    ip        text NOT NULL,
    kind      text NOT NULL CHECK (kind IN ('code_request', 'code', 'password')),
    ok        boolean NOT NULL
);
CREATE INDEX sign_in_attempts_phone_idx ON sign_in_attempts (phone, at);
CREATE INDEX sign_in_attempts_ip_idx ON sign_in_attempts (ip, at);
CREATE INDEX sign_in_attempts_staff_idx ON sign_in_attempts (staff_id, at) WHERE staff_id IS NOT NULL;

-- Deactivating a staff member (the registry loader sets active = false) ends their
-- sessions and revokes their tokens in the same transaction, whoever wrote the row;
-- reactivating them later does not bring those back. Authentication also checks
-- staff.active, so nothing depends on this trigger alone.
CREATE FUNCTION staff_access_ended() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE api_sessions SET ended_at = now()
     WHERE ended_at IS NULL
       AND (staff_id = NEW.id OR token_id IN (SELECT id FROM api_tokens WHERE staff_id = NEW.id));
    UPDATE api_tokens SET revoked_at = now() WHERE staff_id = NEW.id AND revoked_at IS NULL;
    UPDATE sign_in_codes SET used_at = now() WHERE staff_id = NEW.id AND used_at IS NULL;
    INSERT INTO audit_log (at, token_id, role, action, subject, detail, actor, actor_name)
    VALUES (now(), NULL, NEW.role, 'staff_deactivated', 'staff:' || NEW.id, '{}', 'registry', 'registry');
    RETURN NULL;
END
$$;
CREATE TRIGGER staff_access_ended
    AFTER UPDATE OF active ON staff
    FOR EACH ROW WHEN (OLD.active AND NOT NEW.active)
    EXECUTE FUNCTION staff_access_ended();

-- The live feed says who took an incident by key (`staff:<id>`, `integration:<name>`),
-- never by name: its payloads carry no names (0012); a console reads the name through
-- the list it refetches.
CREATE OR REPLACE FUNCTION live_events_incident() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM live_event_emit('incident', NEW.kind, NEW.area_id, jsonb_build_object(
        'change', CASE TG_OP WHEN 'INSERT' THEN 'opened' ELSE 'updated' END,
        'id', NEW.id, 'code', NEW.code, 'kind', NEW.kind, 'severity', NEW.severity,
        'state', NEW.state, 'urgency', NEW.urgency, 'area_id', NEW.area_id,
        'resident_id', NEW.resident_id, 'device_id', NEW.device_id,
        'opened_at', NEW.opened_at, 'acknowledged_at', NEW.acknowledged_at,
        'acknowledged_by_id', NEW.acknowledged_by,
        'resolved_at', NEW.resolved_at, 'outcome', NEW.outcome));
    RETURN NULL;
END
$$;
