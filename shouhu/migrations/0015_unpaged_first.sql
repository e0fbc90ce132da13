-- A mass event (issue 13): every incident gets one call or SMS out before any gets its
-- second channel. When a sender leases an incident's first phone page it marks that
-- incident's other pending first pages ``behind_sibling``; senders take unmarked first
-- pages first, each claim served by this index, so the claim never scans the rows of
-- incidents that are already being paged.
ALTER TABLE notification_attempts ADD COLUMN behind_sibling boolean NOT NULL DEFAULT false;
CREATE INDEX notification_attempts_unpaged_first_idx ON notification_attempts (channel, created_at, id)
    WHERE state = 'pending' AND purpose = 'page' AND round = 0 AND step = 0 AND attempt = 1
      AND NOT behind_sibling;
