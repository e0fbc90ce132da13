-- Supervision (督办, issue 15): the overview counts incidents supervised in a period.
-- A supervision is a timeline entry; this index finds those few among the many
-- entries (every attempt and callback) without reading the whole timeline table.
CREATE INDEX incident_events_supervised_idx ON incident_events (at, incident_id) WHERE event = 'supervised';
