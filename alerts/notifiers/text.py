"""Text from the registry, made safe for what a notifier builds: TwiML, SMS bodies, CAP XML.

The registry refuses control characters at load (``devices/registry_file.py``), but
a name or address may still hold one: written before that check, through the API,
or by hand in the database. One such character (Excel's in-cell line break ``\\x0b``,
a stray bell ``\\x07``, a NUL) cannot be carried by XML 1.0 at all, even escaped,
so the TwiML of every call about that resident would be malformed and the call
would say nothing. Every notifier therefore passes free text through
:func:`plain_text` before it builds a message; XML escaping (``&``, ``<``) is left
to the XML builders, which do it right.
"""

from __future__ import annotations

import re

# A line break in all but name: Excel's in-cell break (\x0b), form feed, CR, LF,
# NEL (\x85), and Unicode's line and paragraph separators.
_BREAK = re.compile("\r\n|[\n\x0b\x0c\r\x85\u2028\u2029]")
# Every other C0 and C1 control, DEL, lone surrogates and the two non-characters
# XML refuses. Tab is handled with the breaks.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")


def plain_text(value: str, *, multiline: bool = False) -> str:
    """``value`` without control characters, fit for TwiML, an SMS or CAP XML.

    Line breaks of every kind (LF, CR, CRLF, ``\\x0b``, ``\\x0c``, NEL, U+2028/9) and
    tabs become a space, so "12号\\x0b3单元" reads "12号 3单元" rather than
    "12号3单元"; any other control character is dropped. With ``multiline`` (a CAP
    description, medical notes) line breaks become ``\\n`` and tabs are kept.

    Args:
        value: Free text, as stored.
        multiline: Keep line structure instead of folding it into one line.

    Returns:
        The text; unchanged when it holds no control character.
    """
    text = _CONTROL.sub("", value)
    if multiline:
        return _BREAK.sub("\n", text)
    return _BREAK.sub(" ", text).replace("\t", " ")
