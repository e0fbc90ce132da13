"""What the tests share: the session's real services, builders of registry rows, the
escalation and care fixtures, the helpers that start a hub, a broker or a stack, and the
browser tests' Chromium (``browser.py``: the ``browser`` fixture, logging in, screenshots).

Test modules import from here (or get fixtures through ``tests/conftest.py``), never
from one another: ``tests/test_layout_tests.py`` holds the suite to that.
"""
