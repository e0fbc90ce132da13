"""The gateways' msg_ids grow with the time their messages carry (devices/msg_ids.py), so
each device's new ledger keys land at the end of its range of the primary key."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.msg_ids import derived_msg_id

DIGESTS = st.text(alphabet="0123456789abcdef", min_size=40, max_size=40)
# (hypothesis takes naive bounds and attaches the zone)
TIMES = st.datetimes(
    min_value=datetime(2000, 1, 1),  # noqa: DTZ001
    max_value=datetime(2200, 1, 1),  # noqa: DTZ001
    timezones=st.just(UTC),
)


def test_the_id_is_the_prefix_the_milliseconds_and_the_digest() -> None:
    at = datetime(2026, 12, 4, 10, 15, tzinfo=timezone(timedelta(hours=8)))
    msg_id = derived_msg_id("watch", at, "ab" * 32)
    assert msg_id == f"watch-{int(at.timestamp() * 1000):012x}-{'ab' * 20}"
    assert len(derived_msg_id("traccar", at, "f" * 64)) <= 64  # the contract's limit


def test_a_time_out_of_range_is_clamped_not_refused() -> None:
    """A watch's clock may say anything: an id is still made, of the fixed width."""
    early = derived_msg_id("watch", datetime(1900, 1, 1, tzinfo=UTC), "0" * 40)
    assert early == f"watch-{0:012x}-{'0' * 40}"


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        derived_msg_id("watch", datetime(2026, 12, 4, 10, 15), "0" * 40)  # noqa: DTZ001


@given(TIMES, TIMES, DIGESTS, DIGESTS)
def test_ids_sort_as_their_times_do(first: datetime, second: datetime, digest_a: str, digest_b: str) -> None:
    a, b = derived_msg_id("watch", first, digest_a), derived_msg_id("watch", second, digest_b)
    if int(first.timestamp() * 1000) < int(second.timestamp() * 1000):
        assert a < b
    elif int(first.timestamp() * 1000) > int(second.timestamp() * 1000):
        assert a > b
