-- Retention of who was called and what they were told (issue 18, hub/retention.py):
-- SHOUHU_CONTACT_DAYS after an incident closed, its attempts keep who, how, when and
-- what became of each call, but the number is masked and the text cleared; its
-- timeline keeps ids and states, not names, numbers or notes. A closed task's note goes
-- after the same days.

-- When the pass masked the incident's contacts; NULL: not yet. Only closed incidents
-- not yet masked are in the index, ordered by when they closed, so each batch starts
-- where the last one stopped.
ALTER TABLE incidents ADD COLUMN contacts_masked_at timestamptz;
CREATE INDEX incidents_contacts_kept_idx ON incidents ((coalesce(resolved_at, cancelled_at, opened_at)))
    WHERE contacts_masked_at IS NULL AND state IN ('resolved', 'cancelled');

-- Closed tasks that still have a note, by when they closed.
CREATE INDEX care_tasks_noted_idx ON care_tasks (closed_at) WHERE note <> '';

-- A timeline entry's detail without the given keys, at any depth (the people in a
-- step's `recipients`, a spooled page's `pages`); everything else as it was.
CREATE FUNCTION jsonb_without_keys(doc jsonb, dropped text[]) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    CASE jsonb_typeof(doc)
    WHEN 'object' THEN
        RETURN coalesce((SELECT jsonb_object_agg(e.key, jsonb_without_keys(e.value, dropped))
                         FROM jsonb_each(doc) AS e WHERE NOT e.key = ANY(dropped)), '{}'::jsonb);
    WHEN 'array' THEN
        RETURN coalesce((SELECT jsonb_agg(jsonb_without_keys(a.item, dropped) ORDER BY a.n)
                         FROM jsonb_array_elements(doc) WITH ORDINALITY AS a(item, n)), '[]'::jsonb);
    ELSE
        RETURN doc;
    END CASE;
END
$$;

-- People removed from the registry (deactivated, never deleted) are anonymised after
-- SHOUHU_REGISTRY_DAYS: name, numbers, address, medical notes cleared; the id, the area
-- and the links stay, so old incidents and figures still join. NULL: not (or no
-- longer: a registry load that brings them back fills them in again and clears it).
ALTER TABLE residents ADD COLUMN anonymised_at timestamptz;
ALTER TABLE guardians ADD COLUMN anonymised_at timestamptz;
ALTER TABLE staff ADD COLUMN anonymised_at timestamptz;
-- Nothing but the registry writes these rows, and never an inactive one: its
-- updated_at is when it was deactivated.
CREATE INDEX residents_removed_idx ON residents (updated_at) WHERE NOT active AND anonymised_at IS NULL;
CREATE INDEX guardians_removed_idx ON guardians (updated_at) WHERE NOT active AND anonymised_at IS NULL;
CREATE INDEX staff_removed_idx ON staff (updated_at) WHERE NOT active AND anonymised_at IS NULL;
-- Whether a removed person still has an open incident or task (then they wait).
CREATE INDEX incidents_open_resident_idx ON incidents (resident_id)
    WHERE state IN ('open', 'acknowledged', 'unreached');
CREATE INDEX incidents_open_taker_idx ON incidents (acknowledged_by)
    WHERE state IN ('open', 'acknowledged', 'unreached');
CREATE INDEX care_tasks_open_resident_idx ON care_tasks (resident_id) WHERE state <> 'closed';
CREATE INDEX care_tasks_open_starter_idx ON care_tasks (started_by) WHERE state <> 'closed';
