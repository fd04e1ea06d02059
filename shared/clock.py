"""Hybrid logical clock.

Boards without a real-time clock may boot in 1970, so wall time alone orders nothing.
A hybrid logical clock timestamp is one integer, `wall_ms << 16 | counter`: it follows the
wall clock when that moves forward, never goes backwards, and after receiving a remote
timestamp it is later than that timestamp. Integers compare in causal order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

_COUNTER_BITS = 16
PLAUSIBLE_WALL_MS = 1_704_067_200_000  # 2024-01-01: a wall clock before this has not been set
# The largest timestamp a message may carry (wall times up to the year 4199): a clock that
# observed it still has 2^62 ticks before it leaves SQLite's 64-bit integers.
MAX_TIMESTAMP = (1 << 62) - 1


def pack(wall_ms: int, counter: int) -> int:
    return (wall_ms << _COUNTER_BITS) | counter


def wall_ms(timestamp: int) -> int:
    return timestamp >> _COUNTER_BITS


class HybridClock:
    def __init__(self, last: int = 0, wall: Callable[[], float] = time.time) -> None:
        self._last = last
        self._wall = wall
        self._lock = threading.Lock()

    @property
    def last(self) -> int:
        return self._last

    def now(self) -> int:
        """A timestamp later than every one this clock has issued or seen."""
        with self._lock:
            self._last = max(self._last + 1, pack(int(self._wall() * 1000), 0))
            return self._last

    def observe(self, remote: int) -> None:
        """Take a received timestamp into account, so later local events order after it."""
        with self._lock:
            if remote > self._last:
                self._last = remote
