"""Percentiles shared by the latency benchmarks."""

from __future__ import annotations


def percentile(values: list[float], fraction: float) -> float:
    """The value at ``fraction`` of the sorted values (index ``int(fraction * n)``, capped at the last)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
