"""Metrics loadable with ``evaluate`` without the Hub."""

from __future__ import annotations

import os


def load_metric(name: str = "accuracy"):
    """``evaluate.load`` of a metric shipped in this package (works offline); hub name as a fallback."""
    import evaluate

    local = os.path.join(os.path.dirname(__file__), f"{name}.py")
    if os.path.isfile(local):
        return evaluate.load(local)
    return evaluate.load(name)
