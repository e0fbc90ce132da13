"""The county's report tables as files: CSV and Excel, with Chinese headers, streamed.

A county files its monthly figures (incidents, visits, repair orders, 在线率) as
spreadsheets. ``api/routes/exports.py`` decides who may export what and which rows;
here are the columns and the two writers, both of which take rows one at a time from
an iterator (a server-side cursor), so an export of a year of incidents never holds
more than a chunk of it in memory:

- CSV: written row by row and sent in chunks of about 64 KiB as they fill.
- Excel: openpyxl's write-only mode, which writes each row to a temporary file as it
  is appended (a normal workbook keeps every cell as an object); the finished .xlsx
  is then sent from disk in chunks. Its first byte therefore leaves after the last
  row was read — the memory stays bounded, the wait does not shrink.

Times are local to ``SHOUHU_TIMEZONE`` (what the county's staff read), without an
offset: Excel has no time zones; each time column's header names the zone. The first
row is the headers, then one row per record, in CSV and Excel alike.
"""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from openpyxl import Workbook

CHUNK_BYTES = 64 * 1024
# A UTF-8 byte order mark before the first header. Excel (the county's staff open the
# file by double-clicking it) reads a CSV without one in the system's ANSI code page —
# GBK on a Chinese Windows — and shows every Chinese header and name as mojibake; with
# it, Excel reads UTF-8. Other readers (Python's utf-8-sig, LibreOffice) skip it.
UTF8_BOM = "\ufeff"
# A cell beginning with one of these is a formula to Excel (CSV injection): free text
# (a task's note) is written with a leading apostrophe instead, as OWASP advises.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


class ExportFormat(StrEnum):
    CSV = "csv"
    XLSX = "xlsx"


MEDIA_TYPES: dict[ExportFormat, str] = {
    ExportFormat.CSV: "text/csv; charset=utf-8",
    ExportFormat.XLSX: "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}


@dataclass(frozen=True, slots=True)
class Column:
    """One column: its Chinese header and how a stored value becomes a cell."""

    header: str
    cell: Callable[[Any], Any] = lambda value: value


@dataclass(frozen=True, slots=True)
class Table:
    """A sheet's name and columns; rows are tuples in the columns' order."""

    sheet: str
    columns: tuple[Column, ...]

    @property
    def headers(self) -> list[str]:
        return [c.header for c in self.columns]

    def cells(self, row: Sequence[Any]) -> list[Any]:
        return [_safe(column.cell(value)) for column, value in zip(self.columns, row, strict=True)]


def _safe(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def local_time(zone: ZoneInfo) -> Callable[[Any], Any]:
    """A cell for a stored time: local to ``zone``, to the second, without an offset (Excel has none)."""

    def cell(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.astimezone(zone).replace(tzinfo=None, microsecond=0)
        return value

    return cell


def csv_stream(table: Table, rows: Iterable[Sequence[Any]]) -> Iterator[bytes]:
    """The table as UTF-8 CSV with a byte order mark, in chunks of about ``CHUNK_BYTES``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    buffer.write(UTF8_BOM)
    writer.writerow(table.headers)
    for row in rows:
        writer.writerow(table.cells(row))
        if buffer.tell() >= CHUNK_BYTES:
            yield buffer.getvalue().encode("utf-8")
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode("utf-8")


def xlsx_stream(table: Table, rows: Iterable[Sequence[Any]]) -> Iterator[bytes]:
    """The table as an .xlsx workbook (write-only: rows go to disk as they come), sent from disk in chunks."""
    workbook = Workbook(write_only=True)
    sheet = workbook.create_sheet(table.sheet)
    sheet.append(table.headers)
    for row in rows:
        sheet.append(table.cells(row))
    with tempfile.TemporaryFile() as file:
        workbook.save(file)
        file.seek(0)
        while chunk := file.read(CHUNK_BYTES):
            yield chunk
