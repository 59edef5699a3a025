"""Measurements of the authentication suite, printed by ``conftest.py`` at the end."""

from __future__ import annotations

#: name -> (value, unit)
MEASUREMENTS: dict[str, tuple[float, str]] = {}


def record(name: str, value: float, unit: str) -> None:
    MEASUREMENTS[name] = (value, unit)
