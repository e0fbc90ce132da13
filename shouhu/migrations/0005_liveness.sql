-- Liveness (hub/liveness.py): device deadlines, the no-heartbeat sweeper, and the
-- record of the hub's own ingest outages, during which deadlines pause.

-- When the evidence behind device_state.online was received: a message's
-- received_at, or for no_heartbeat the last_seen the sweeper judged from. A sighting
-- older than this cannot change `online` (hubs commit out of order: a Last Will
-- handled late must not override a message received after it). Invariant:
-- state_at >= last_seen.
ALTER TABLE device_state ADD COLUMN state_at timestamptz;

-- Each hub stamps its row about once a second while it is connected to both the
-- broker and the database. The newest alive_at across hubs is the last moment ingest
-- was known to work; it is also what survives a restart of every hub and sweeper.
CREATE TABLE ingest_heartbeats (
    hub_id    text PRIMARY KEY,
    alive_at  timestamptz NOT NULL
);

-- Times when no hub could ingest: that time is `unknown`, not offline. A row is
-- opened (ended_at NULL) by the sweeper when it sees ingest down, closed by the
-- first heartbeat after the outage (which also records gaps nobody saw open), and
-- applied (every online deadline pushed by the gap) exactly once by the sweeper.
-- started_at is the last heartbeat before the gap, so every hub and sweeper that
-- sees the same outage names it the same way; the unique key makes that one row.
CREATE TABLE ingest_gaps (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at        timestamptz NOT NULL UNIQUE,
    ended_at          timestamptz,
    applied_at        timestamptz,
    deadlines_pushed  integer,
    CHECK (ended_at IS NULL OR ended_at >= started_at),
    CHECK (applied_at IS NULL OR ended_at IS NOT NULL)
);
