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
