"""
The loop that drives the node's background workers (the outbox relay, the
sync worker): run a step, run it again at once while it finds work, sleep
when it finds none, back off when it fails, wake early when told there is
work, and stop between steps.

What a step does over the network or in git may be cut at the shutdown
grace deadline; L{InFlight} keeps that work so that a stop can cancel it.
Database statements are never cancelled: they are short, and a cancelled
query could leave its connection in an unknown state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from gitlawb.db.service import DatabaseUnavailable

__all__ = ["InFlight", "WorkLoop", "stop_within_grace"]

T = TypeVar("T")


class WorkLoop:
    """
    Calls C{step} over and over until stopped.

    C{step} returns whether it found work: when it did, the loop calls it
    again at once; when it did not, the loop sleeps C{poll_interval} seconds
    or until L{wake} is called.  A step that raises is logged (quietly while
    the database is not up yet) and retried after a delay that doubles up to
    C{max_error_delay}.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        step: Callable[[], Awaitable[bool]],
        *,
        name: str,
        poll_interval: float,
        max_error_delay: float = 30.0,
    ) -> None:
        self._clock = clock
        self._step = step
        self.name = name
        self._poll_interval = poll_interval
        self._max_error_delay = max(max_error_delay, poll_interval)
        self._running: Deferred[None] | None = None
        self._sleep: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self._woken = False
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._running is not None and not self._running.called

    def start(self) -> None:
        """
        Start calling the step (the first call happens at once).
        """
        self._stopping = False
        self._running = Deferred.fromCoroutine(self._run())
        self._running.addErrback(
            lambda f: self.log.failure("work loop {name} died", f, name=self.name)
        )

    def wake(self) -> None:
        """
        There may be work: end the current sleep, or skip the next one.
        """
        self._woken = True
        sleep = self._sleep
        if sleep is not None and not sleep.called:
            sleep.callback(None)

    def stop(self) -> Deferred[None]:
        """
        Stop after the step in progress.

        @return: a Deferred that fires once no step runs.
        """
        self._stopping = True
        self.wake()
        running = self._running
        if running is None or running.called:
            return succeed(None)
        return Deferred.fromCoroutine(_settled(running))

    async def _run(self) -> None:
        error_delay = self._poll_interval
        while not self._stopping:
            try:
                found = await self._step()
            except CancelledError:
                if self._stopping:
                    return
                self.log.warn("work loop {name}: step cancelled", name=self.name)
                found = False
            except DatabaseUnavailable:
                await self._pause(error_delay)
                error_delay = min(error_delay * 2, self._max_error_delay)
                continue
            except Exception:
                self.log.failure(
                    "work loop {name}: step failed; retrying in {delay:.1f}s",
                    name=self.name,
                    delay=error_delay,
                )
                await self._pause(error_delay)
                error_delay = min(error_delay * 2, self._max_error_delay)
                continue
            error_delay = self._poll_interval
            if not found:
                await self._pause(self._poll_interval)

    async def _pause(self, seconds: float) -> None:
        if self._woken or self._stopping:
            self._woken = False
            return
        sleep: Deferred[None] = Deferred()
        self._sleep = sleep
        self._timer = self._clock.callLater(seconds, sleep.callback, None)
        try:
            await sleep
        finally:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
            self._sleep = None
            self._woken = False


async def _settled(running: Deferred[None]) -> None:
    try:
        await running
    except Exception:
        pass


class InFlight:
    """
    Work a shutdown may cut: network calls and git runs started through
    L{run}.  L{cut} cancels all of them.

    @ivar cutting: set once L{cut} was called, so that the code awaiting the
        work can tell a cut from any other cancellation.
    """

    def __init__(self) -> None:
        self._work: set[Deferred[Any]] = set()
        self.cutting = False

    def __len__(self) -> int:
        return len(self._work)

    def run(self, work: Coroutine[Any, Any, T]) -> Deferred[T]:
        """
        Start C{work} and keep it until it ends.

        @return: a Deferred that fires with its result; after L{cut} it fails
            with C{CancelledError}.
        """
        running = Deferred.fromCoroutine(work)
        if self.cutting:
            running.cancel()
            return running
        self._work.add(running)

        def forget(result: object) -> object:
            self._work.discard(running)
            return result

        running.addBoth(forget)
        return running

    def cut(self) -> int:
        """
        Cancel all work in flight.

        @return: how many were cancelled.
        """
        self.cutting = True
        work = list(self._work)
        for running in work:
            running.cancel()
        return len(work)


async def stop_within_grace(
    clock: IReactorTime,
    loops: list[WorkLoop],
    in_flight: InFlight,
    grace: float,
) -> int:
    """
    Stop C{loops} and wait for their steps; at C{grace} seconds cut whatever
    is still in flight, then wait for the steps to wind down (they release
    what they had claimed).

    @return: how many pieces of work were cut.
    """
    cut = 0

    def deadline() -> None:
        nonlocal cut
        # Counted first: cancelling may finish the steps, and so this
        # coroutine, before cut() returns.
        cut = len(in_flight)
        in_flight.cut()

    timer = clock.callLater(grace, deadline)
    try:
        await DeferredList([loop.stop() for loop in loops], consumeErrors=True)
    finally:
        if timer.active():
            timer.cancel()
    return cut
