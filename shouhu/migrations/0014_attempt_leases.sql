-- Sending without a lock (issue 13): a sender claims an attempt by committing a lease
-- on it (who, which database session, until when), calls the provider outside any
-- transaction, then settles the attempt in a new transaction. The attempt stays
-- 'pending' while leased; a lease whose session is gone (the router died) or whose
-- time ran out is taken over, and the attempt re-sent under the same key, once.
ALTER TABLE notification_attempts
    ADD COLUMN leased_by text,
    ADD COLUMN lease_pid integer,
    ADD COLUMN leased_until timestamptz,
    ADD COLUMN sends integer NOT NULL DEFAULT 0;
-- A CAP message's retries carry the first try's identifier (the platform deduplicates on it).
CREATE INDEX notification_attempts_pending_channel_idx ON notification_attempts (channel, created_at, id)
    WHERE state = 'pending';
