"""A job's event queue: a reader that keeps up gets every event; one that falls behind costs at most one waiting
preview set and the newest steps, and still gets every started, done and error event, in order."""

from __future__ import annotations

import asyncio
import threading
import time
import tracemalloc

import pytest

from ldm.serve.events import MAX_WAITING_STEPS, StreamEvents


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def progress(step: int, previews: object = None) -> dict:
    event = {"event": "progress", "step": step, "steps": 1000}
    if previews is not None:
        event["previews"] = previews
    return event


def read_all(loop: asyncio.AbstractEventLoop, events: StreamEvents) -> list[dict]:
    """Every event up to the final one (done, error or cancelled)."""

    async def until_final() -> list[dict]:
        got = [await events.get()]
        while got[-1]["event"] not in ("done", "error", "cancelled"):
            got.append(await events.get())
        return got

    return loop.run_until_complete(asyncio.wait_for(until_final(), timeout=30))


def test_a_reader_that_keeps_up_gets_every_step_and_preview(loop):
    events = StreamEvents(loop)
    got = []
    for step in range(1, 101):
        events.put(progress(step, previews=[step]))
        got.append(loop.run_until_complete(events.get()))
    assert [event["previews"] for event in got] == [[step] for step in range(1, 101)]
    assert events.dropped_steps == events.dropped_previews == 0


def test_a_reader_that_falls_behind_gets_the_newest_preview_and_every_final_event_in_order(loop):
    events = StreamEvents(loop)
    events.put({"event": "started"})
    for step in range(1, 1001):
        events.put(progress(step, previews=[f"preview of step {step}"]))
    events.put({"event": "done", "images": ["image"]})
    got = read_all(loop, events)
    assert got[0] == {"event": "started"} and got[-1] == {"event": "done", "images": ["image"]}
    steps = [event["step"] for event in got[1:-1]]
    assert steps == sorted(steps) and steps[-1] == 1000 and len(steps) <= MAX_WAITING_STEPS
    assert [event["previews"] for event in got if "previews" in event] == [["preview of step 1000"]]
    assert events.peak_previews == 1 and events.dropped_previews == 999
    assert events.peak_waiting <= MAX_WAITING_STEPS + 2  # the steps, started and done


def test_a_preview_waits_while_newer_steps_without_previews_arrive(loop):
    """Previews every 50 steps, read late: the newest preview is kept however many plain steps follow it."""
    events = StreamEvents(loop)
    for step in range(1, 121):
        events.put(progress(step, previews=[step] if step % 50 == 0 else None))
    events.put({"event": "error", "error": "a RequestError"})
    got = read_all(loop, events)
    assert [event["previews"] for event in got if "previews" in event] == [[100]]
    assert got[-2]["step"] == 120 and got[-1]["event"] == "error"


def test_waiting_memory_is_one_preview_set_however_many_steps_go_unread(loop):
    """2000 steps of 100 kB previews nobody reads: the queue holds about one of them, not 200 MB."""
    events = StreamEvents(loop)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for step in range(1, 2001):
            events.put(progress(step, previews=[bytes(100_000)]))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 300_000
    assert events.peak_previews == 1


def test_events_put_on_another_thread_wake_the_reader(loop):
    events = StreamEvents(loop)

    def worker() -> None:
        for step in range(1, 51):
            events.put(progress(step))
            time.sleep(0.001)
        events.put({"event": "cancelled"})

    thread = threading.Thread(target=worker)
    thread.start()
    got = read_all(loop, events)
    thread.join()
    assert got[-1] == {"event": "cancelled"}
    assert [event["step"] for event in got[:-1]][-1] == 50
