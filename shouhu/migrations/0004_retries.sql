-- Retries with backoff (issue #4): a retry is a new attempt row, due no earlier than
-- not_before; delivery callbacks move attempts through their provider states.
ALTER TABLE notification_attempts ADD COLUMN not_before timestamptz;
CREATE INDEX notification_attempts_pending_idx ON notification_attempts (created_at, id) WHERE state = 'pending';
