"""The ``msg_id`` of a message a Shouhu gateway publishes for a device: time first.

The hub's ledger decides duplicates on ``(device_id, msg_id)`` through a B-tree primary
key. An id that grows with time lands each device's new keys at the end of that device's
range, on a leaf page written a moment ago; a random one (a UUIDv4, a bare hash) lands on
a random leaf of an index that holds a week of a county's keys, and after every
checkpoint each such leaf costs PostgreSQL a full-page image in the WAL — at 10 million
keys, ten times the WAL per message and twice PostgreSQL's CPU (docs/BENCHMARKS.md).
So the contract recommends time-ordered ids (UUIDv7, or ``{boot_id}-{counter}``), and
the gateways derive theirs as ``{prefix}-{milliseconds:012x}-{digest}``: the time is the
one the message carries (the watch's, Traccar's, or the gateway's clock where the device
gave none), so a retry of the same frame or forward gives the same id, as the digest does.
"""

from __future__ import annotations

from datetime import datetime

# 12 hex digits of Unix milliseconds reach the year 10889.
_MAX_MS = 16**12 - 1
DIGEST_HEX = 40


def derived_msg_id(prefix: str, at: datetime, digest_hex: str) -> str:
    """``{prefix}-{ms:012x}-{digest}``: ``at`` (aware) is the time the message carries,
    ``digest_hex`` a hash of everything that identifies it (its first 40 digits are used)."""
    if at.tzinfo is None:
        raise ValueError("a msg_id's time must be timezone-aware")
    millis = min(max(int(at.timestamp() * 1000), 0), _MAX_MS)
    return f"{prefix}-{millis:012x}-{digest_hex[:DIGEST_HEX]}"
