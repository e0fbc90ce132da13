"""A Prometheus collector whose figures are read from the database at each scrape."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager

import psycopg
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from psycopg_pool import PoolTimeout

from shouhu.db import Conn

log = logging.getLogger(__name__)


class DatabaseCollector(Collector, ABC):
    """Reads its families with :meth:`read` on a connection from ``connect``, at each scrape.

    A scrape while the database is away leaves them out rather than fail: the rest of
    ``/metrics`` (and whatever says the database is down) is still served.
    """

    # What the log line names when the figures are left out.
    figures = "database figures"

    def __init__(self, connect: Callable[[], AbstractContextManager[Conn]]) -> None:
        self._connect = connect

    def describe(self) -> Iterator[Metric]:
        # Nothing: several apps in one process (tests) may each register one.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        try:
            with self._connect() as conn:
                families = list(self.read(conn))
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("%s left out of this scrape: %s", self.figures, exc)
            return
        yield from families

    @abstractmethod
    def read(self, conn: Conn) -> Iterable[Metric]:
        """The metric families, read on ``conn``."""
