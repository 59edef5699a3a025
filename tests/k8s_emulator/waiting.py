"""Polling with a deadline, for conditions no watch or store event announces (pure timing)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["poll_until"]

T = TypeVar("T")


def poll_until(
    check: Callable[[], T], *, timeout: float, interval: float = 0.01, what: str = "condition"
) -> T:
    """Call ``check`` every ``interval`` seconds until it returns something truthy; return it.

    Raises ``TimeoutError`` naming ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not reached within {timeout}s")
        time.sleep(interval)
