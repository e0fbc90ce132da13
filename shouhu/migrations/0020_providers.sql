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

-- Every provider failed a page (alerts/retry.py, `providers_down`): the operators' console
-- notices are queued as attempts; the live feed tells the consoles at once, as an
-- incident event with change 'providers_down' (the same fields as the incident's own).
CREATE FUNCTION live_events_console_alarm() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    i incidents%ROWTYPE;
BEGIN
    SELECT * INTO i FROM incidents WHERE id = NEW.incident_id;
    PERFORM live_event_emit('incident', i.kind, i.area_id, jsonb_build_object(
        'change', 'providers_down',
        'id', i.id, 'code', i.code, 'kind', i.kind, 'severity', i.severity,
        'state', i.state, 'urgency', i.urgency, 'area_id', i.area_id,
        'resident_id', i.resident_id, 'device_id', i.device_id,
        'opened_at', i.opened_at, 'acknowledged_at', i.acknowledged_at,
        'acknowledged_by_id', i.acknowledged_by,
        'resolved_at', i.resolved_at, 'outcome', i.outcome));
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER live_events_console_alarm
    AFTER INSERT ON notification_attempts DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.channel = 'console' AND NEW.purpose = 'notice')
    EXECUTE FUNCTION live_events_console_alarm();
