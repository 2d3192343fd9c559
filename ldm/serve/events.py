"""One request's events on their way from the generation thread to the client: bounded however slowly it reads.

The worker puts events from its thread (`put`); the app reads them in the event loop (`await get()`). A client
that reads more slowly than the sampler steps would otherwise make the server hold every step's previews, so
what waits is bounded by what is still worth sending:
- a preview set replaces any preview set still waiting (that event stays, without its previews): at most one;
- at most `MAX_WAITING_STEPS` progress events wait; past that the oldest one without previews is dropped (the
  newer steps supersede it);
- every other event (started, done, error, cancelled) is kept, in order: a job sends only a few of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque

MAX_WAITING_STEPS = 16  # progress events a reader may fall behind by before the oldest are dropped


class StreamEvents:
    """A bounded, thread-safe event queue for one job: `put` from any thread, `await get()` in `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._waiting: deque[dict] = deque()
        self._ready = asyncio.Event()  # set in the loop's thread when an event has arrived
        self.dropped_steps = 0  # progress events dropped unread
        self.dropped_previews = 0  # preview sets dropped unread
        self.peak_waiting = 0  # the most events that waited at once
        self.peak_previews = 0  # the most preview sets that waited at once

    def put(self, event: dict) -> None:
        """Add `event` (from any thread), dropping stale progress the reader has not taken yet."""
        with self._lock:
            reader_may_wait = not self._waiting  # else a wake is on its way, or the reader has yet to look
            if event["event"] == "progress":
                self._make_room_for(event)
            self._waiting.append(event)
            self.peak_waiting = max(self.peak_waiting, len(self._waiting))
            self.peak_previews = max(self.peak_previews, sum("previews" in waiting for waiting in self._waiting))
        if reader_may_wait:  # one wake per run of unread events: the loop's own queue stays short too
            with contextlib.suppress(RuntimeError):  # the loop has closed: the server is shutting down
                self._loop.call_soon_threadsafe(self._ready.set)

    async def get(self) -> dict:
        """The oldest event still waiting; waits for one when none is."""
        while True:
            with self._lock:
                if self._waiting:
                    return self._waiting.popleft()
                self._ready.clear()  # a put after this unlocks schedules set() after it, so no wake is lost
            await self._ready.wait()

    def _make_room_for(self, event: dict) -> None:
        """Under the lock: strip the previews a newer set replaces, drop the oldest step past the bound."""
        steps = [i for i, waiting in enumerate(self._waiting) if waiting["event"] == "progress"]
        if "previews" in event:
            for i in steps:
                if "previews" in self._waiting[i]:
                    self._waiting[i] = {key: value for key, value in self._waiting[i].items() if key != "previews"}
                    self.dropped_previews += 1
        plain = [i for i in steps if "previews" not in self._waiting[i]]
        if len(steps) >= MAX_WAITING_STEPS and plain:  # at most one waits with previews, so plain is never empty
            del self._waiting[plain[0]]
            self.dropped_steps += 1
