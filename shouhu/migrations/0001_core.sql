-- Shouhu core schema: registry, device state, ledger, dead letters, incidents,
-- escalation, API tokens, audit. Time-series tables (telemetry, camera health) are
-- created by shouhu/timeseries.py, on TimescaleDB or native partitioning.
-- Enumerated values are text with CHECK constraints; devices/kinds.py holds the
-- same values as StrEnums and a test keeps the two in step.

CREATE TABLE areas (
    id          text PRIMARY KEY,
    parent_id   text REFERENCES areas (id),
    level       text NOT NULL CHECK (level IN ('county', 'township', 'community', 'grid', 'micro_grid')),
    name        text NOT NULL,
    active      boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (parent_id IS NOT NULL OR level = 'county')
);
CREATE INDEX areas_parent_idx ON areas (parent_id);

-- Residents: the elders. medical_notes and location are sensitive (PIPL); the API
-- shows them only to roles that need them and audits every read.
CREATE TABLE residents (
    id             text PRIMARY KEY,
    name           text NOT NULL,
    grid_id        text NOT NULL REFERENCES areas (id),
    address        text NOT NULL,
    lives_alone    boolean NOT NULL DEFAULT true,
    phone          text,
    medical_notes  text NOT NULL DEFAULT '',
    lat            double precision,
    lon            double precision,
    active         boolean NOT NULL DEFAULT true,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX residents_grid_idx ON residents (grid_id);

CREATE TABLE guardians (
    id           text PRIMARY KEY,
    resident_id  text NOT NULL REFERENCES residents (id),
    name         text NOT NULL,
    phone        text NOT NULL,
    relation     text NOT NULL DEFAULT '',
    priority     integer NOT NULL DEFAULT 1 CHECK (priority >= 1),
    active       boolean NOT NULL DEFAULT true,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX guardians_resident_idx ON guardians (resident_id, priority);

CREATE TABLE staff (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('grid_worker', 'technician', 'operator', 'duty_officer')),
    phone       text NOT NULL,
    active      boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE staff_areas (
    staff_id  text NOT NULL REFERENCES staff (id),
    area_id   text NOT NULL REFERENCES areas (id),
    PRIMARY KEY (staff_id, area_id)
);
CREATE INDEX staff_areas_area_idx ON staff_areas (area_id);

-- Duty rosters: recurring shifts in local time (SHOUHU_TIMEZONE). A shift whose
-- end_time is at or before start_time runs past midnight into the next day; the
-- weekday is the day the shift starts.
CREATE TABLE duty_shifts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    staff_id    text NOT NULL REFERENCES staff (id),
    area_id     text NOT NULL REFERENCES areas (id),
    weekdays    smallint[] NOT NULL CHECK (weekdays <@ ARRAY[1, 2, 3, 4, 5, 6, 7]::smallint[]),
    start_time  time NOT NULL,
    end_time    time NOT NULL,
    active      boolean NOT NULL DEFAULT true,
    UNIQUE (staff_id, area_id, weekdays, start_time, end_time)
);
CREATE INDEX duty_shifts_area_idx ON duty_shifts (area_id) WHERE active;

CREATE TABLE devices (
    id                    text PRIMARY KEY,
    kind                  text NOT NULL CHECK (kind IN ('wristband', 'camera')),
    resident_id           text REFERENCES residents (id),
    area_id               text REFERENCES areas (id),
    model                 text NOT NULL DEFAULT '',
    heartbeat_interval_s  integer CHECK (heartbeat_interval_s > 0),
    heartbeat_misses      integer CHECK (heartbeat_misses >= 1),
    active                boolean NOT NULL DEFAULT true,
    updated_at            timestamptz NOT NULL DEFAULT now(),
    CHECK (kind <> 'wristband' OR resident_id IS NOT NULL),
    CHECK (kind <> 'camera' OR area_id IS NOT NULL)
);
CREATE INDEX devices_resident_idx ON devices (resident_id);
CREATE INDEX devices_area_idx ON devices (area_id);

-- The latest known state of each device; liveness reads and writes here. A row
-- exists only once the device has spoken.
CREATE TABLE device_state (
    device_id       text PRIMARY KEY REFERENCES devices (id),
    online          boolean,
    offline_reason  text,
    last_seen       timestamptz,
    deadline        timestamptz,
    battery         smallint,
    worn            boolean,
    lat             double precision,
    lon             double precision,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_state_deadline_idx ON device_state (deadline) WHERE online;

CREATE TABLE device_events (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id  text NOT NULL,
    at         timestamptz NOT NULL,
    event      text NOT NULL,
    reason     text,
    detail     jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX device_events_device_idx ON device_events (device_id, at);

-- The ledger of seen (device, msg_id): decides redelivery (same hash) versus reused
-- id (different hash). Not partitioned: a unique index on a partitioned table must
-- include the partition column. Pruned after at least 7 days.
CREATE TABLE message_ledger (
    device_id     text NOT NULL,
    msg_id        text NOT NULL,
    payload_hash  bytea NOT NULL,
    channel       text NOT NULL,
    received_at   timestamptz NOT NULL,
    PRIMARY KEY (device_id, msg_id)
);
CREATE INDEX message_ledger_received_idx ON message_ledger (received_at);

CREATE TABLE dead_letters (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at  timestamptz NOT NULL,
    hub_id       text NOT NULL,
    topic        text NOT NULL,
    payload      bytea NOT NULL,
    reason       text NOT NULL,
    detail       text NOT NULL DEFAULT ''
);
CREATE INDEX dead_letters_received_idx ON dead_letters (received_at);
CREATE INDEX dead_letters_reason_idx ON dead_letters (reason, received_at);

-- Escalation policies: one default per incident kind (area_id NULL), overridable
-- per area. A snapshot is frozen into each incident when it opens.
CREATE TABLE escalation_policies (
    id          text PRIMARY KEY,
    kind        text NOT NULL CHECK (kind IN ('sos', 'fall', 'sos_unregistered', 'wristband_offline',
                                              'not_worn', 'low_battery', 'camera_offline')),
    area_id     text REFERENCES areas (id),
    steps       jsonb NOT NULL,
    active      boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX escalation_policies_scope_idx
    ON escalation_policies (kind, coalesce(area_id, '')) WHERE active;

CREATE TABLE incidents (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code               text NOT NULL UNIQUE,
    kind               text NOT NULL CHECK (kind IN ('sos', 'fall', 'sos_unregistered', 'wristband_offline',
                                                     'not_worn', 'low_battery', 'camera_offline')),
    severity           text NOT NULL CHECK (severity IN ('red', 'yellow', 'blue')),
    state              text NOT NULL DEFAULT 'open'
                       CHECK (state IN ('open', 'acknowledged', 'unreached', 'resolved', 'cancelled')),
    resident_id        text REFERENCES residents (id),
    device_id          text,
    area_id            text REFERENCES areas (id),
    opened_at          timestamptz NOT NULL,
    urgency            integer NOT NULL DEFAULT 1,
    payload_unreadable boolean NOT NULL DEFAULT false,
    policy_snapshot    jsonb NOT NULL DEFAULT '{}',
    -- Fencing token: bumped whenever the escalation is re-planned, so an action
    -- claimed under an older token is refused.
    escalation_token   bigint NOT NULL DEFAULT 1,
    acknowledged_at    timestamptz,
    acknowledged_by    text,
    resolved_at        timestamptz,
    outcome            text,
    lat                double precision,
    lon                double precision,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
-- At most one open red incident per resident, enforced by the database so two hubs
-- racing on the same press cannot open two.
CREATE UNIQUE INDEX incidents_one_open_red_per_resident
    ON incidents (resident_id)
    WHERE severity = 'red' AND state IN ('open', 'acknowledged', 'unreached') AND resident_id IS NOT NULL;
-- The same for an unregistered wristband, which has no resident.
CREATE UNIQUE INDEX incidents_one_open_unregistered_per_device
    ON incidents (device_id)
    WHERE kind = 'sos_unregistered' AND state IN ('open', 'acknowledged', 'unreached');
CREATE INDEX incidents_state_idx ON incidents (state, opened_at DESC);
CREATE INDEX incidents_area_idx ON incidents (area_id, opened_at DESC);

-- The timeline: every state change, attempt, callback and acknowledgement.
CREATE TABLE incident_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id  bigint NOT NULL REFERENCES incidents (id),
    at           timestamptz NOT NULL,
    event        text NOT NULL,
    actor        text,
    detail       jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX incident_events_incident_idx ON incident_events (incident_id, at, id);

-- Due escalation actions: rows, not timers, so a crash loses none. Router workers
-- claim them with FOR UPDATE SKIP LOCKED.
CREATE TABLE escalation_actions (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id  bigint NOT NULL REFERENCES incidents (id),
    step         integer NOT NULL CHECK (step >= 0),
    round        integer NOT NULL DEFAULT 0,
    token        bigint NOT NULL,
    due_at       timestamptz NOT NULL,
    state        text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'stale', 'cancelled')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    done_at      timestamptz,
    UNIQUE (incident_id, round, step, token)
);
CREATE INDEX escalation_actions_due_idx ON escalation_actions (due_at) WHERE state = 'pending';

-- One row per notification attempt, written before the provider call and completed
-- with the provider's id after it; the key makes a re-send after a crash reuse it.
CREATE TABLE notification_attempts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id     bigint NOT NULL REFERENCES incidents (id),
    action_id       bigint REFERENCES escalation_actions (id),
    round           integer NOT NULL DEFAULT 0,
    step            integer NOT NULL,
    recipient_kind  text NOT NULL,
    recipient_id    text NOT NULL,
    address         text NOT NULL,
    channel         text NOT NULL CHECK (channel IN ('voice', 'sms', 'console', 'webhook')),
    attempt         integer NOT NULL DEFAULT 1,
    state           text NOT NULL DEFAULT 'pending',
    provider_id     text,
    error           text,
    created_at      timestamptz NOT NULL,
    sent_at         timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (incident_id, round, step, recipient_id, channel, attempt)
);
CREATE INDEX notification_attempts_provider_idx ON notification_attempts (provider_id);

-- API bearer tokens, stored as SHA-256 of the secret (the secret is 256 random bits,
-- so a fast hash is enough); expiring and revocable.
CREATE TABLE api_tokens (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_hash  bytea NOT NULL UNIQUE,
    role        text NOT NULL CHECK (role IN ('admin', 'operator', 'grid_worker', 'technician', 'platform')),
    areas       text[] NOT NULL DEFAULT '{}',
    label       text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz,
    revoked_at  timestamptz
);

-- Every read of a resident's personal data and every acknowledgement.
CREATE TABLE audit_log (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at         timestamptz NOT NULL,
    token_id   bigint,
    role       text NOT NULL,
    action     text NOT NULL,
    subject    text NOT NULL,
    detail     jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at_idx ON audit_log (at);
