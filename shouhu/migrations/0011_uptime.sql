-- Camera uptime (issue #7): mean time to repair over a period reads the repair orders
-- closed in it; without this it would read every task ever closed.
CREATE INDEX care_tasks_repair_closed_idx ON care_tasks (closed_at) WHERE kind = 'repair' AND state = 'closed';
