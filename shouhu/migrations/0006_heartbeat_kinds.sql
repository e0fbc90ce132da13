-- Liveness windows per device kind, from the registry's `heartbeats:` section (issue #5).
-- A device's own values override these; these override SHOUHU_HEARTBEAT_*.
CREATE TABLE heartbeat_policies (
    kind        text PRIMARY KEY CHECK (kind IN ('wristband', 'camera')),
    interval_s  integer NOT NULL CHECK (interval_s > 0),
    misses      integer NOT NULL CHECK (misses >= 1),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
