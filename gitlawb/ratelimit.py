"""
Sliding-window rate limits (PROTOCOL.md section 10), and the janitor service
that sweeps expired entries.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

HOUR = 3600.0


class RateLimiter:
    """
    At most C{limit} hits per key in any window of C{window} seconds.

    Each key keeps the times of its hits inside the window (at most C{limit}
    of them), so memory is bounded by the number of active keys times the
    limit.  A limit of 0 disables the limiter.
    """

    def __init__(
        self, name: str, limit: int, clock: IReactorTime, window: float = HOUR
    ) -> None:
        self.name = name
        self.limit = limit
        self.window = window
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}

    def hit(self, key: str) -> float | None:
        """
        Count one hit for C{key} unless it is over the limit.

        @return: C{None} when the hit is allowed, else the seconds until the
            oldest hit leaves the window (the C{Retry-After} to send).
        """
        if self.limit <= 0:
            return None
        now = self._clock.seconds()
        hits = self._hits.setdefault(key, deque())
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) >= self.limit:
            return max(1.0, math.ceil(hits[0] + self.window - now))
        hits.append(now)
        return None

    def sweep(self) -> int:
        """
        Forget keys whose hits have all left the window.

        @return: how many keys were forgotten.
        """
        cutoff = self._clock.seconds() - self.window
        expired = [
            k for k, hits in self._hits.items() if not hits or hits[-1] <= cutoff
        ]
        for key in expired:
            del self._hits[key]
        return len(expired)

    def __len__(self) -> int:
        return len(self._hits)


class Sweepable(Protocol):
    def sweep(self) -> int: ...


class RateLimitJanitor(Service):
    """
    Sweeps expired entries from every limiter (and anything else with a
    C{sweep()} method, such as the replay guard) every C{interval} seconds.
    """

    name = "ratelimit-janitor"
    log = Logger()

    def __init__(
        self,
        sweepables: Iterable[Sweepable],
        clock: IReactorTime,
        interval: float = 60.0,
    ) -> None:
        self._sweepables = list(sweepables)
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = clock
        self._interval = interval

    def sweep(self) -> int:
        removed = 0
        for item in self._sweepables:
            removed += int(item.sweep())
        if removed:
            self.log.debug("swept expired rate-limit entries={count}", count=removed)
        return removed

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> Deferred[None]:
        """
        Stop the sweep timer.

        @return: a Deferred that has already fired: a sweep never waits on I/O.
        """
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return succeed(None)
