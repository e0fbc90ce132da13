"""What Shouhu and Aliyun call the same thing: an attempt's ``out_id``, a phone number.

The Aliyun notifiers set ``OutId`` on each ``IvrCall`` and ``SendSms`` and the
receipt handler (``alerts/aliyun_receipts.py``) reads it back from the provider's
push: both go through here, so the two can never disagree.
"""

from __future__ import annotations

__all__ = ["address_from_aliyun", "aliyun_number", "aliyun_out_id", "parse_out_id"]

# Aliyun's OutId is a string of at most 15 characters; an attempt id's decimal form fits.
OUT_ID_MAX_LENGTH = 15
MAINLAND = "+86"


def aliyun_out_id(attempt_id: int) -> str:
    """The ``OutId`` a page sends with: the notification attempt's id, in decimal."""
    if attempt_id <= 0:
        raise ValueError(f"attempt id {attempt_id} is not positive")
    return str(attempt_id)


def parse_out_id(out_id: str) -> int | None:
    """The attempt id an ``out_id`` names, or ``None`` for anything Shouhu never sets.

    Only the canonical decimal form counts (no sign, no leading zero, no spaces), so
    one attempt has exactly one ``out_id``.
    """
    if not out_id or len(out_id) > OUT_ID_MAX_LENGTH or not out_id.isascii() or not out_id.isdigit():
        return None
    if out_id.startswith("0"):
        return None
    return int(out_id)


def aliyun_number(address: str) -> str:
    """A registry phone number (E.164) as Aliyun takes and reports it: a mainland number without ``+86``."""
    return address.removeprefix(MAINLAND) if address.startswith(MAINLAND) else address


def address_from_aliyun(number: str) -> str:
    """The E.164 address of a number Aliyun reports (``1381111xxxx``); the inverse of :func:`aliyun_number`."""
    number = number.strip()
    return number if number.startswith("+") else MAINLAND + number
