-- Provider receipts (issue 17): what a provider pushed (Aliyun's call results, keypresses,
-- SMS reports and replies), stored by the receiving route before it answers and
-- processed by a worker of the API processes (alerts/receipts.py owns this table).
-- `key` is what the provider's retry of the same push repeats, so a retry is a no-op.
CREATE TABLE provider_receipts (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider    text NOT NULL,
    kind        text NOT NULL,
    key         text NOT NULL,
    body        jsonb NOT NULL,
    -- The call or message it is about (Aliyun's call_id), and whether it is that call's
    -- result: a result waits until the call's other receipts (its keypress) are processed.
    ref         text NOT NULL DEFAULT '',
    final       boolean NOT NULL DEFAULT false,
    received_at timestamptz NOT NULL,
    -- Processing: tries so far, the last error, and not before when the next try.
    tries       integer NOT NULL DEFAULT 0,
    not_before  timestamptz NOT NULL,
    error       text,
    -- Set once processed (or given up as poison, or dead-lettered as malformed).
    handled_at  timestamptz,
    outcome     text,
    UNIQUE (provider, kind, key)
);
-- The queue: the few rows not processed yet, oldest first.
CREATE INDEX provider_receipts_waiting_idx ON provider_receipts (id) WHERE handled_at IS NULL;
