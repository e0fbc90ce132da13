"""Which wristband a watch is: the ``watch_id`` of the registry file's wristbands
(docs/contract.md, "Registry file").

The watch gateway and the Traccar bridge read the registry YAML themselves (``SHOUHU_REGISTRY_FILE``), the same file
`shouhu registry load` loads, so it needs no database. It re-reads the file when its
modification time changes; a file that no longer parses keeps the last good mapping
(logged), so a typo never unmaps every watch at once.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from devices.registry_file import RegistryFileError, parse_registry, watch_wristbands

log = logging.getLogger(__name__)


class RegistryWatches:
    """A ``WristbandLookup`` over a registry file; ``None`` for no file (no watch known)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime_ns: int | None = None
        self._watches: dict[str, str] = {}
        self._unreadable = False
        if path is not None:
            self._reload()  # at start a bad file is the operator's to fix: raise
            if self._mtime_ns is None:
                raise RegistryFileError(path, ["cannot read: no such file"])

    def __call__(self, watch_id: str) -> str | None:
        if self.path is not None:
            self._reload()
        return self._watches.get(watch_id)

    @property
    def count(self) -> int:
        return len(self._watches)

    def _reload(self) -> None:
        assert self.path is not None
        try:
            mtime_ns = self.path.stat().st_mtime_ns
        except OSError as exc:
            if self._mtime_ns is not None and not self._unreadable:  # once, not on every frame
                log.warning("registry file %s unreadable (%s): keeping %d watches", self.path, exc, len(self._watches))
            self._unreadable = True
            return
        self._unreadable = False
        with self._lock:
            if mtime_ns == self._mtime_ns:
                return
            first = self._mtime_ns is None
            self._mtime_ns = mtime_ns
            try:
                watches = watch_wristbands(parse_registry(self.path))
            except RegistryFileError as exc:
                if first:
                    raise
                log.error("registry file %s refused, keeping %d watches: %s", self.path, len(self._watches), exc)
                return
            self._watches = watches
            log.info("registry file %s: %d watches", self.path, len(watches))
