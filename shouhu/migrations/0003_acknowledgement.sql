-- Acknowledgement, resolution and cancellation (issue #4).

ALTER TABLE incidents
    ADD COLUMN acknowledged_by_name text,
    ADD COLUMN acknowledged_via     text,
    ADD COLUMN resolution_note      text NOT NULL DEFAULT '',
    ADD COLUMN cancelled_at         timestamptz,
    ADD CONSTRAINT incidents_outcome_known CHECK (
        outcome IS NULL OR outcome IN ('false_alarm', 'visited_fine', 'sent_to_hospital',
                                       'handled_by_guardian', 'emergency_services', 'other'));

-- What an attempt is for: a page (part of a step), a re-page of whoever acknowledged,
-- a notice (who took it, a cancel), or a CAP message to the emergency platform.
ALTER TABLE notification_attempts
    ADD COLUMN purpose text NOT NULL DEFAULT 'page'
        CHECK (purpose IN ('page', 'repage', 'notice', 'cap_alert', 'cap_update', 'cap_cancel')),
    ADD COLUMN body text,
    DROP CONSTRAINT notification_attempts_incident_id_round_step_recipient_id_c_key,
    ADD CONSTRAINT notification_attempts_key
        UNIQUE (incident_id, purpose, round, step, recipient_id, channel, attempt);

-- A step of the chain, or the check that re-escalates an acknowledged incident left
-- unresolved past SHOUHU_RESOLVE_TIMEOUT_S.
ALTER TABLE escalation_actions
    ADD COLUMN kind text NOT NULL DEFAULT 'step' CHECK (kind IN ('step', 'resolve_check')),
    DROP CONSTRAINT escalation_actions_incident_id_round_step_token_key,
    ADD CONSTRAINT escalation_actions_key UNIQUE (incident_id, kind, round, step, token);
