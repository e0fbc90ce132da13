"""The hub's /metrics with bulk workers (issue 19): each worker's counters and histograms
are added to the hub's own families, label by label, and each worker's share is shown."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from hub.workers import WorkerPool


def test_worker_samples_are_summed_into_the_hubs_families_label_by_label() -> None:
    registry = CollectorRegistry()
    stored = Counter("shouhu_test_stored", "stored", ["channel"], registry=registry)
    stored.labels("telemetry").inc(3)
    batch = Histogram("shouhu_test_batch", "batch sizes", buckets=(1, 10), registry=registry)
    batch.observe(5)
    Counter("shouhu_test_errors", "errors", ["lane"], registry=registry)  # no child in the hub yet
    Counter("other_total_thing", "not ours", registry=registry).inc()
    pool = WorkerPool([], threading.Event(), registry=registry)
    pool.record(
        2,
        {
            ("shouhu_test_stored_total", (("channel", "telemetry"),)): 4.0,
            ("shouhu_test_stored_total", (("channel", "health"),)): 2.0,
            ("shouhu_test_batch_bucket", (("le", "10.0"),)): 1.0,
            ("shouhu_test_batch_bucket", (("le", "+Inf"),)): 1.0,
            ("shouhu_test_batch_count", ()): 1.0,
            ("shouhu_test_batch_sum", ()): 7.0,
            ("shouhu_test_errors_total", (("lane", "bulk"),)): 1.0,
            ("shouhu_hub_messages_stored_total", (("channel", "telemetry"),)): 4.0,
        },
    )
    pool.record(3, {("shouhu_test_stored_total", (("channel", "telemetry"),)): 5.0})

    text = generate_latest(pool.collector).decode()

    assert 'shouhu_test_stored_total{channel="telemetry"} 12.0' in text  # 3 + 4 + 5
    assert 'shouhu_test_stored_total{channel="health"} 2.0' in text  # only a worker saw it
    assert 'shouhu_test_batch_bucket{le="10.0"} 2.0' in text
    assert 'shouhu_test_batch_bucket{le="1.0"} 0.0' in text
    assert "shouhu_test_batch_count 2.0" in text
    assert "shouhu_test_batch_sum 12.0" in text
    assert 'shouhu_test_errors_total{lane="bulk"} 1.0' in text
    assert "other_total_thing_total 1.0" in text  # not ours: served as it is
    assert 'shouhu_hub_worker_messages_stored_total{worker="2"} 4.0' in text
    assert 'shouhu_hub_worker_messages_stored_total{worker="3"} 0.0' in text
    assert "shouhu_hub_workers_ready 0.0" in text  # none started


def test_without_worker_samples_the_hubs_families_are_served_unchanged() -> None:
    registry = CollectorRegistry()
    Counter("shouhu_test_stored", "stored", ["channel"], registry=registry).labels("telemetry").inc(3)
    pool = WorkerPool([], threading.Event(), registry=registry)
    text = generate_latest(pool.collector).decode()
    assert 'shouhu_test_stored_total{channel="telemetry"} 3.0' in text
