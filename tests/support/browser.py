"""Debian's Chromium, as the consoles' browser tests and benchmark launch it."""

from __future__ import annotations

CHROMIUM = "/usr/bin/chromium"
# The flags this machine's closed network needs (no background fetches to Google).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
