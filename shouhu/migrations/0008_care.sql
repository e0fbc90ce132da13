-- Care between emergencies (issue #6): visit tasks (网格员探视) and camera repair work
-- orders as closed loops with an owner, a deadline and an outcome; low-battery
-- notices at most once a day; maintenance windows; quiet hours.

-- When the wristband's `worn` flag last changed value (the hub's received_at): how
-- long a band has been lying on the table.
ALTER TABLE device_state ADD COLUMN worn_since timestamptz;

-- How care incidents end, beside the red outcomes.
ALTER TABLE incidents
    DROP CONSTRAINT incidents_outcome_known,
    ADD CONSTRAINT incidents_outcome_known CHECK (
        outcome IS NULL OR outcome IN ('false_alarm', 'visited_fine', 'sent_to_hospital',
                                       'handled_by_guardian', 'emergency_services', 'other',
                                       'device_recovered', 'task_completed', 'battery_charged'));

-- At most one open yellow or blue incident per device and kind: a camera flapping, or
-- a band reporting low battery every minute, joins the one already open.
CREATE UNIQUE INDEX incidents_one_open_care_per_device
    ON incidents (device_id, kind)
    WHERE severity <> 'red' AND state IN ('open', 'acknowledged', 'unreached');

-- Visit tasks and repair work orders (任务书、时间表、责任人, closed one by one: 逐一销号).
-- owner_area_id is who holds it now: the resident's grid or the camera's area first,
-- one level up each time it is overdue.
CREATE TABLE care_tasks (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id       bigint NOT NULL UNIQUE REFERENCES incidents (id),
    kind              text NOT NULL CHECK (kind IN ('visit', 'repair')),
    device_id         text NOT NULL REFERENCES devices (id),
    resident_id       text REFERENCES residents (id),
    area_id           text NOT NULL REFERENCES areas (id),
    owner_area_id     text NOT NULL REFERENCES areas (id),
    level             integer NOT NULL DEFAULT 0 CHECK (level >= 0),
    reason            text NOT NULL,
    state             text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'started', 'closed')),
    opened_at         timestamptz NOT NULL,
    -- When the device fell silent (or took the band off): time to repair counts from here.
    problem_since     timestamptz NOT NULL,
    due_at            timestamptz NOT NULL,
    started_at        timestamptz,
    started_by        text,
    started_by_name   text,
    -- The device spoke again; a repair order closes once it has stayed back for the hold.
    recovered_at      timestamptz,
    flaps             integer NOT NULL DEFAULT 0,
    closed_at         timestamptz,
    closed_by         text,
    closed_by_name    text,
    outcome           text CHECK (outcome IN ('resident_fine', 'band_charged', 'band_replaced', 'band_broken',
                                              'resident_away', 'resident_in_hospital', 'repaired', 'replaced',
                                              'power_restored', 'network_restored', 'device_recovered',
                                              'other')),
    note              text NOT NULL DEFAULT '',
    CHECK ((state = 'closed') = (closed_at IS NOT NULL))
);
CREATE INDEX care_tasks_due_idx ON care_tasks (due_at) WHERE state <> 'closed';
CREATE INDEX care_tasks_owner_idx ON care_tasks (owner_area_id, opened_at) WHERE state <> 'closed';
CREATE INDEX care_tasks_device_idx ON care_tasks (device_id, opened_at);

-- Maintenance: a camera under repair, a resident in hospital. Silences non-SOS
-- incidents for the device (or every device in the area and below), and is excluded
-- from camera uptime. Never an SOS or a fall.
CREATE TABLE maintenance_windows (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    area_id       text REFERENCES areas (id),
    device_id     text REFERENCES devices (id),
    starts_at     timestamptz NOT NULL,
    ends_at       timestamptz NOT NULL,
    reason        text NOT NULL,
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL,
    cancelled_at  timestamptz,
    CHECK (num_nonnulls(area_id, device_id) = 1),
    CHECK (ends_at > starts_at)
);
CREATE INDEX maintenance_windows_device_idx ON maintenance_windows (device_id, ends_at) WHERE cancelled_at IS NULL;
CREATE INDEX maintenance_windows_area_idx ON maintenance_windows (area_id, ends_at) WHERE cancelled_at IS NULL;

-- Quiet hours per area (local time in SHOUHU_TIMEZONE; end at or before start runs
-- past midnight), from the registry; the nearest area up the tree applies. Non-urgent
-- (blue) notices wait until they end.
CREATE TABLE quiet_hours (
    area_id     text PRIMARY KEY REFERENCES areas (id),
    start_time  time NOT NULL,
    end_time    time NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (start_time <> end_time)
);

-- Low-battery notices: at most one per device, audience and local day.
CREATE TABLE battery_notices (
    device_id    text NOT NULL REFERENCES devices (id),
    local_day    date NOT NULL,
    audience     text NOT NULL CHECK (audience IN ('guardian', 'grid_worker')),
    incident_id  bigint NOT NULL REFERENCES incidents (id),
    battery      smallint NOT NULL,
    queued_at    timestamptz NOT NULL,
    send_after   timestamptz NOT NULL,
    PRIMARY KEY (device_id, local_day, audience)
);
