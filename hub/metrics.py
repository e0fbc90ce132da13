"""The hub's Prometheus metrics, served on SHOUHU_METRICS_PORT."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES_RECEIVED = Counter("shouhu_hub_messages_received_total", "MQTT messages received, by channel", ["channel"])
MESSAGES_STORED = Counter(
    "shouhu_hub_messages_stored_total", "Messages stored and acknowledged, by channel", ["channel"]
)
DEAD_LETTERS = Counter("shouhu_hub_dead_letters_total", "Messages dead-lettered, by reason", ["reason"])
ALARMS = Counter(
    "shouhu_hub_alarms_total",
    "SOS and fall messages by outcome (opened, joined, redelivery, …)",
    ["outcome"],
)
COMMIT_SECONDS = Histogram(
    "shouhu_hub_commit_seconds",
    "From receipt to commit, by lane (alarm: one message; bulk: a batch's oldest message)",
    ["lane"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
BATCH_SIZE = Histogram(
    "shouhu_hub_batch_size",
    "Messages per bulk-lane transaction",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2000),
)
BATCH_SECONDS = Histogram(
    "shouhu_hub_batch_commit_seconds",
    "Time to store and commit one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
QUEUE_DEPTH = Gauge("shouhu_hub_queue_depth", "Messages received and not yet stored, by lane", ["lane"])
SESSIONS_LOST = Counter("shouhu_hub_sessions_lost_total", "Reconnects where the broker had no session for us")
STALE_ACKS = Counter(
    "shouhu_hub_stale_acks_total",
    "Acknowledgements withheld because the message came on an earlier connection",
)
DEVICES = Gauge("shouhu_devices", "Devices by kind and liveness (online, offline, unknown)", ["kind", "state"])
LIVENESS_TRANSITIONS = Counter(
    "shouhu_hub_liveness_transitions_total", "Devices going online or offline, by kind and reason", ["kind", "reason"]
)
LIVENESS_FAILURES = Counter(
    "shouhu_hub_liveness_failures_total", "Batches whose liveness update failed (the messages were stored)"
)
DATABASE_RETRIES = Counter("shouhu_hub_database_retries_total", "Transactions retried after a database error")
RECEIPTS = Counter("shouhu_hub_receipts_total", "Alarm receipts published to wristbands after the commit")
LANE_ERRORS = Counter(
    "shouhu_hub_message_errors_total",
    "Messages whose storing raised something other than a database outage, by lane (each one dead-lettered)",
    ["lane"],
)
PRUNED = Counter(
    "shouhu_hub_pruned_rows_total",
    "Rows deleted (or locations cleared, contacts masked) past retention, by table: message_ledger, dead_letters,"
    " audit_log, incident_locations, sessions, incident_contacts (incidents), task_notes, removed_people",
    ["table"],
)
BULK_YIELDS = Counter(
    "shouhu_hub_bulk_yields_total",
    "Bulk batches held back (at most 1 s each) because the alarm lane had an alarm in hand",
)
ALARM_GROUP_SIZE = Histogram(
    "shouhu_hub_alarm_group_size",
    "Alarms committed together in one transaction (a mass event); 1 is the usual case",
    buckets=(1, 2, 5, 10, 25, 50, 100),
)
