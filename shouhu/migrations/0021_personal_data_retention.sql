-- Retention of personal data (issue 18, hub/retention.py). Two indexes so each hourly
-- batch finds its rows without reading the whole table.

-- An incident's location (the wristband's GPS at the press) is cleared once the
-- incident is closed and older than SHOUHU_LOCATION_DAYS. Only incidents that still
-- hold a location are in this index, so it stays as small as the incidents not yet
-- past their days.
CREATE INDEX incidents_located_idx ON incidents (opened_at) WHERE lat IS NOT NULL OR lon IS NOT NULL;

-- Sign-in attempts (a phone number and a client address each) go after
-- SHOUHU_SESSION_DAYS; their other indexes lead with the phone, the address or the staff id.
CREATE INDEX sign_in_attempts_at_idx ON sign_in_attempts (at);
