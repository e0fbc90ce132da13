-- The sender claims an incident's first pages before anything else (issue #4): an
-- index for exactly those, so the claim stays cheap with thousands of attempts pending.
CREATE INDEX notification_attempts_first_pages_idx ON notification_attempts (created_at, id)
    WHERE state = 'pending' AND purpose = 'page' AND round = 0 AND step = 0 AND attempt = 1;
