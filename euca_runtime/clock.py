"""Clocks. Protocol logic never reads time directly: it is handed a Clock.

`monotonic()` is for lease validity and timeouts (never goes back, unaffected by NTP);
`wall()` is only for human-facing timestamps in events and logs.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class RealClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class ManualClock:
    """A clock a test or the simulation moves by hand. `rate` models drift."""

    def __init__(self, start: float = 1000.0, rate: float = 1.0) -> None:
        self._now = start
        self.rate = rate

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return 1_700_000_000.0 + self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go back")
        self._now += seconds * self.rate
