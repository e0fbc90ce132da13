-- Visits from the seeds (issue #15): a follow-up visit (网格员探视) after an SOS or a
-- fall is resolved, and recurring visits to residents the registry marks monthly or
-- weekly. Both are care tasks of kind 'visit'; the care sweeper opens them.

-- How often the registry asks for a visit (NULL: only when something happens).
ALTER TABLE residents ADD COLUMN visit_frequency text CHECK (visit_frequency IN ('monthly', 'weekly'));

-- A recurring visit hangs on a blue incident of its own, so its timeline, its notices
-- and its escalation when overdue are the ones every care task has.
ALTER TABLE incidents DROP CONSTRAINT incidents_kind_check;
ALTER TABLE incidents ADD CONSTRAINT incidents_kind_check CHECK (
    kind IN ('sos', 'fall', 'sos_unregistered', 'wristband_offline', 'not_worn', 'low_battery', 'camera_offline',
             'scheduled_visit'));

-- A visit to a person, not about a device: no device (so a band coming back never
-- withdraws it). `period` names a recurring visit's period ('2026-12', '2026-W49'):
-- one task per resident and period. `deadline` is the first due time, which an
-- escalation never moves: the visit rate counts on time against it.
ALTER TABLE care_tasks ALTER COLUMN device_id DROP NOT NULL;
ALTER TABLE care_tasks ADD COLUMN period text;
ALTER TABLE care_tasks ADD COLUMN deadline timestamptz;
ALTER TABLE care_tasks ADD CONSTRAINT care_tasks_device_or_person
    CHECK (device_id IS NOT NULL OR (kind = 'visit' AND resident_id IS NOT NULL));
ALTER TABLE care_tasks ADD CONSTRAINT care_tasks_period_is_recurring CHECK (period IS NULL OR reason = 'scheduled');
CREATE UNIQUE INDEX care_tasks_one_per_period ON care_tasks (resident_id, period) WHERE period IS NOT NULL;
CREATE INDEX care_tasks_planned_deadline_idx ON care_tasks (deadline)
    WHERE kind = 'visit' AND reason IN ('follow_up', 'scheduled');

-- escalation_policies.kind names incident kinds too, and must list the same ones.
ALTER TABLE escalation_policies DROP CONSTRAINT escalation_policies_kind_check;
ALTER TABLE escalation_policies ADD CONSTRAINT escalation_policies_kind_check CHECK (
    kind IN ('sos', 'fall', 'sos_unregistered', 'wristband_offline', 'not_worn', 'low_battery', 'camera_offline',
             'scheduled_visit'));

-- The sweeper looks for SOS and falls resolved lately without a follow-up visit.
CREATE INDEX incidents_resolved_red_idx ON incidents (resolved_at) WHERE kind IN ('sos', 'fall') AND state = 'resolved';
