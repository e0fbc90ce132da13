-- Which provider carries a phone page (issue 17): Twilio or Aliyun, chosen per area, with
-- failover from the primary to the secondary. Every voice and SMS attempt records the
-- provider it went out on (a retry keeps it, a fallback names the other); console and
-- webhook attempts have none. Until now Twilio carried every phone page.
ALTER TABLE notification_attempts
    ADD COLUMN provider text CHECK (provider IN ('twilio', 'aliyun')),
    ADD CONSTRAINT notification_attempts_provider_channel
        CHECK (provider IS NULL OR channel IN ('voice', 'sms')) NOT VALID;
UPDATE notification_attempts SET provider = 'twilio' WHERE channel IN ('voice', 'sms');
ALTER TABLE notification_attempts VALIDATE CONSTRAINT notification_attempts_provider_channel;

-- An area's phone providers, from the registry (``phone_providers:``): the nearest area
-- up the tree that names them applies; none → SHOUHU_PHONE_PRIMARY / _SECONDARY.
CREATE TABLE area_phone_providers (
    area_id    text PRIMARY KEY REFERENCES areas (id),
    primary_provider    text NOT NULL CHECK (primary_provider IN ('twilio', 'aliyun')),
    secondary_provider  text CHECK (secondary_provider IN ('twilio', 'aliyun')),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK (secondary_provider IS DISTINCT FROM primary_provider)
);
