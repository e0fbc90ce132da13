-- The incident list (issue #7): newest first over the whole county, and its pages,
-- served by an index instead of a sort of every incident (bench/incident_list.py).
CREATE INDEX incidents_opened_idx ON incidents (opened_at DESC, id DESC);
