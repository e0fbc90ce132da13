"""Camera uptime arithmetic: pure functions over transitions and exclusions, no database."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pglast
import pytest

from devices.uptime import Span, StateChange, Uptime, day_buckets, measure, merge, roll_up, total
from shouhu.timeseries import HEALTH_DAILY, health_daily_statements

ZONE = ZoneInfo("Asia/Shanghai")
DAY = datetime(2026, 11, 24, tzinfo=ZONE).astimezone(UTC)


def h(hours: float) -> datetime:
    return DAY + timedelta(hours=hours)


WHOLE_DAY = [Span(h(0), h(24))]


def test_offline_six_hours_with_two_hours_of_maintenance_while_online_is_16_of_22() -> None:
    changes = [StateChange(h(-5), True), StateChange(h(8), False, "no_heartbeat"), StateChange(h(14), True)]
    [day] = measure(changes, WHOLE_DAY, maintenance=[Span(h(2), h(4))])
    assert (day.online_s, day.offline_s, day.maintenance_s, day.unknown_s) == (16 * 3600, 6 * 3600, 7200, 0)
    assert day.ratio == pytest.approx(16 / 22)


def test_maintenance_over_the_outage_takes_it_out_of_the_denominator_18_of_22() -> None:
    changes = [StateChange(h(-5), True), StateChange(h(8), False, "no_heartbeat"), StateChange(h(14), True)]
    [day] = measure(changes, WHOLE_DAY, maintenance=[Span(h(12), h(14))])
    assert (day.online_s, day.offline_s, day.maintenance_s) == (18 * 3600, 4 * 3600, 7200)
    assert day.ratio == pytest.approx(18 / 22)
    assert day.outages == 1


def test_time_before_the_first_transition_and_in_ingest_gaps_is_unknown() -> None:
    changes = [StateChange(h(6), True), StateChange(h(20), False, "last_will")]
    [day] = measure(changes, WHOLE_DAY, unknown=[Span(h(10), h(11)), Span(h(10), h(10.5))])
    assert (day.unknown_s, day.online_s, day.offline_s) == (7 * 3600, 13 * 3600, 4 * 3600)
    assert day.offline_by_reason() == {"last_will": 4 * 3600}


def test_unknown_wins_over_maintenance_so_no_second_is_counted_twice() -> None:
    [day] = measure([StateChange(h(-1), True)], WHOLE_DAY, unknown=[Span(h(1), h(3))], maintenance=[Span(h(2), h(5))])
    assert (day.unknown_s, day.maintenance_s, day.online_s) == (7200, 7200, 20 * 3600)
    assert day.unknown_s + day.maintenance_s + day.monitored_s == 24 * 3600


def test_an_outage_begun_under_maintenance_or_before_the_window_is_not_counted() -> None:
    changes = [
        StateChange(h(-2), False, "reported:power"),
        StateChange(h(1), True),
        StateChange(h(3), False, "reported:video_lost"),  # under maintenance
        StateChange(h(5), True),
        StateChange(h(7), False, None),  # counted, reason unspecified
    ]
    [day] = measure(changes, WHOLE_DAY, maintenance=[Span(h(2), h(4))])
    assert day.outages == 1
    assert day.offline_by_reason() == {"reported:power": 3600, "reported:video_lost": 3600, "unspecified": 17 * 3600}


def test_buckets_split_an_outage_across_midnight_and_add_up_to_the_period() -> None:
    changes = [StateChange(h(-1), True), StateChange(h(23), False, "no_heartbeat"), StateChange(h(25), True)]
    buckets = [Span(h(0), h(24)), Span(h(24), h(48))]
    first, second = measure(changes, buckets)
    assert (first.offline_s, second.offline_s) == (3600, 3600)
    assert (first.outages, second.outages) == (1, 0)
    [period] = measure(changes, [Span(h(0), h(48))])
    whole = first + second
    assert (whole.online_s, whole.offline_s, whole.outages) == (period.online_s, period.offline_s, period.outages)


def test_buckets_must_be_contiguous() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        measure([], [Span(h(0), h(1)), Span(h(2), h(3))])


def test_roll_up_is_time_weighted_not_a_mean_of_ratios() -> None:
    always = measure([StateChange(h(-1), True)], WHOLE_DAY)[0]
    late = measure([StateChange(h(18), True), StateChange(h(21), False, "no_heartbeat")], WHOLE_DAY)[0]
    assert (always.ratio, late.ratio) == (1.0, 0.5)
    parents: dict[str, str | None] = {"county": None, "town": "county", "grid": "town"}
    areas = roll_up([("grid", [always]), ("town", [late])], parents, frozenset({"town", "grid"}))
    assert areas["grid"][0].cameras == 1
    town = areas["town"][0]
    assert (town.cameras, town.online_s, town.monitored_s) == (2, 27 * 3600, 30 * 3600)
    assert town.ratio == pytest.approx(0.9)  # a mean of the two ratios would say 0.75
    assert "county" not in areas
    assert total([always, late]) == town


def test_nothing_monitored_has_no_ratio_and_repairs_have_a_mean() -> None:
    assert Uptime(unknown_s=60).ratio is None
    repairs = Uptime(repairs_closed=1, repair_s=3600) + Uptime(repairs_closed=1, repair_s=7200)
    assert repairs.mttr_s == 5400
    assert Uptime().mttr_s is None


def test_merge_joins_overlapping_and_touching_spans() -> None:
    assert merge([Span(h(3), h(4)), Span(h(0), h(1)), Span(h(1), h(2)), Span(h(0.5), h(1.5)), Span(h(5), h(5))]) == [
        Span(h(0), h(2)),
        Span(h(3), h(4)),
    ]


def test_spans_refuse_naive_and_backward_times() -> None:
    with pytest.raises(ValueError, match="aware"):
        Span(datetime(2026, 1, 1), h(1))  # noqa: DTZ001 (the naive time is the point)
    with pytest.raises(ValueError, match="before it starts"):
        Span(h(2), h(1))


def test_local_days_begin_at_midnight_in_the_zone() -> None:
    window = Span(h(-8), h(30))  # 16:00 the day before to 06:00 the day after, local
    days = day_buckets(window, ZONE)
    assert [d for d, _ in days] == [date(2026, 11, 23), date(2026, 11, 24), date(2026, 11, 25)]
    assert days[1][1] == Span(datetime(2026, 11, 23, 16, tzinfo=UTC), datetime(2026, 11, 24, 16, tzinfo=UTC))
    assert days[0][1].start == window.start
    assert days[-1][1].end == window.end


def test_a_daylight_saving_day_is_23_hours_long() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    start = datetime(2026, 3, 29, tzinfo=berlin).astimezone(UTC)
    [(day, span)] = day_buckets(Span(start, start + timedelta(hours=23)), berlin)
    assert day == date(2026, 3, 29)
    assert span.end - span.start == timedelta(hours=23)


def test_timescaledb_statements_parse() -> None:
    statements = health_daily_statements("Asia/Shanghai")
    for statement in statements:
        pglast.parse_sql(statement)
    joined = "\n".join(statements)
    assert f"CREATE MATERIALIZED VIEW {HEALTH_DAILY}" in joined
    assert "WITH (timescaledb.continuous" in joined
    assert "time_bucket(INTERVAL '1 day', received_at, 'Asia/Shanghai')" in joined
    assert "WITH NO DATA" in joined  # allowed inside the migration's transaction
    assert f"add_continuous_aggregate_policy('{HEALTH_DAILY}'" in joined


def test_timescaledb_statements_refuse_an_unknown_zone() -> None:
    with pytest.raises(ValueError, match="Mars"):
        health_daily_statements("Mars/Olympus'; DROP TABLE areas; --")
