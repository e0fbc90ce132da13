"""Shouhu (守护): IoT elder-care and safety monitoring hub."""

__version__ = "0.1.0"
