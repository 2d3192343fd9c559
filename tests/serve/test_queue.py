"""The generation queue under load: batching, limits, cancellation (asked for, or by a client that left), errors,
and nothing kept once a request is answered."""

from __future__ import annotations

import gc
import threading
import time

import httpx
import pytest

from ldm.serve import ServeLimits, create_app, serve_in_background
from ldm.serve.requests import resolve_request
from ldm.serve.schema import GenerateRequest
from ldm.serve.worker import GenerationQueue, Job, QueueFull
from tests.pipeline.tiny_models import tiny_pipeline

PROMPT = "a red circle"


class Recorder:
    """A job's events, and a wait for its last one."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.finished = threading.Event()

    def __call__(self, event: dict) -> None:
        self.events.append(event)
        if event["event"] in ("done", "error", "cancelled"):
            self.finished.set()

    @property
    def last(self) -> str:
        return self.events[-1]["event"]

    def steps(self) -> int:
        return sum(event["event"] == "progress" for event in self.events)


class SlowPipe:
    """The tiny pipeline with a U-Net that takes `delay` seconds per call, counting calls and pipeline batches."""

    def __init__(self, delay: float = 0.0) -> None:
        self.pipe = tiny_pipeline()
        self.unet_calls = 0
        self.batches: list[int] = []
        unet, generate = self.pipe._unet_fn, type(self.pipe).generate

        def slow_unet(*args, **kwargs):
            self.unet_calls += 1
            time.sleep(delay)
            return unet(*args, **kwargs)

        def counting_generate(pipe, request):
            prompt = request.prompt
            self.batches.append(1 if isinstance(prompt, str) else len(prompt))
            return generate(pipe, request)

        self.pipe._unet_fn = slow_unet
        self.pipe.__class__ = type("CountingPipeline", (type(self.pipe),), {"generate": counting_generate})


def job(pipe, record: Recorder | None = None, **body) -> Job:
    spec = resolve_request(GenerateRequest(**{"prompt": PROMPT, "num_inference_steps": 3, **body}), pipe, ServeLimits())
    return Job(spec, record or Recorder())


def run_all(queue: GenerationQueue, jobs: list[Job], timeout: float = 60) -> None:
    """Queue `jobs` before the worker starts (so they wait together), start it, wait for each to finish."""
    for j in jobs:
        queue.submit(j)
    queue.start()
    for j in jobs:
        assert j.on_event.finished.wait(timeout)


@pytest.fixture
def slow():
    return SlowPipe()


def test_compatible_waiting_requests_are_sampled_in_one_call(slow):
    queue = GenerationQueue(slow.pipe, max_queue=8, max_batch=8)
    jobs = [job(slow.pipe, seed=s, num_images_per_prompt=2, prompt=f"{PROMPT} {s}") for s in range(3)]
    run_all(queue, jobs)
    queue.close()
    assert slow.batches == [6] and all(j.on_event.last == "done" for j in jobs)
    assert [len(j.on_event.events[-1]["images"]) for j in jobs] == [2, 2, 2]


def test_a_batched_image_is_the_image_its_request_draws_alone(slow):
    queue = GenerationQueue(slow.pipe, max_queue=8, max_batch=8)
    batched = [job(slow.pipe, seed=5, prompt="a blue square"), job(slow.pipe, seed=9, negative_prompt="red")]
    run_all(queue, batched)
    for j in batched:
        alone = GenerationQueue(slow.pipe, max_queue=1, max_batch=8)
        single = job(
            slow.pipe,
            seed=j.spec.seeds[0],
            prompt=j.spec.request.prompt,
            negative_prompt=j.spec.request.negative_prompt,
        )
        run_all(alone, [single])
        alone.close()
        assert single.on_event.events[-1]["images"][0].tobytes() == j.on_event.events[-1]["images"][0].tobytes()
    queue.close()
    assert slow.batches[0] == 2


def test_batches_hold_only_equal_settings_and_at_most_max_batch_images(slow):
    queue = GenerationQueue(slow.pipe, max_queue=8, max_batch=3)
    jobs = [
        job(slow.pipe, num_images_per_prompt=2),
        job(slow.pipe, num_images_per_prompt=2),  # would make 4 > 3
        job(slow.pipe, num_inference_steps=4),  # other settings
        job(slow.pipe, num_images_per_prompt=1),  # joins the first
        job(slow.pipe, sampler="euler_ancestral", num_images_per_prompt=2),  # stochastic: alone, image by image
    ]
    run_all(queue, jobs)
    queue.close()
    assert slow.batches == [3, 2, 1, 1, 1]


def test_a_full_queue_refuses_with_a_retry_estimate(slow):
    queue = GenerationQueue(slow.pipe, max_queue=2, max_batch=1)
    queue.submit(job(slow.pipe))
    queue.submit(job(slow.pipe))
    with pytest.raises(QueueFull) as full:
        queue.submit(job(slow.pipe))
    assert full.value.retry_after >= 1 and "2 requests waiting" in str(full.value)


def test_a_request_whose_client_left_gives_up_its_place_at_once(slow):
    """A full queue of hung-up clients must not refuse the next honest one until the worker reaches them."""
    queue = GenerationQueue(slow.pipe, max_queue=2, max_batch=1)  # not started: nothing leaves by running
    left = [job(slow.pipe), job(slow.pipe)]
    for j in left:
        queue.submit(j)
        j.cancel()
    assert queue.submit(job(slow.pipe)) == 1
    assert [j.on_event.last for j in left] == ["cancelled", "cancelled"]


def test_a_request_cancelled_while_queued_is_never_sampled(slow):
    queue = GenerationQueue(slow.pipe, max_queue=8, max_batch=1)
    kept, dropped = job(slow.pipe, seed=1), job(slow.pipe, seed=2)
    dropped.cancel()
    run_all(queue, [kept, dropped])
    queue.close()
    assert dropped.on_event.last == "cancelled" and dropped.on_event.steps() == 0
    assert kept.on_event.last == "done" and slow.batches == [1]


def test_a_running_request_stops_at_the_next_step_once_cancelled():
    slow = SlowPipe(delay=0.01)
    queue = GenerationQueue(slow.pipe, max_queue=8, max_batch=8)
    record = Recorder()
    running = job(slow.pipe, record, num_inference_steps=200)
    original = record.__call__

    def cancel_after_three_steps(event: dict) -> None:
        original(event)
        if record.steps() == 3:
            running.cancel()

    running.on_event = cancel_after_three_steps
    queue.submit(running)
    queue.start()
    assert record.finished.wait(30)
    queue.close()
    assert record.last == "cancelled" and record.steps() == 3
    assert slow.unet_calls == 4  # the 4th step's U-Net ran before its callback saw the cancel


def test_a_failing_call_answers_its_requests_and_the_worker_goes_on(slow):
    queue = GenerationQueue(slow.pipe, max_queue=8, max_batch=1)
    broken, fine = job(slow.pipe), job(slow.pipe)

    def fail_once(*args, **kwargs):
        slow.pipe._unet_fn = unet
        raise RuntimeError("out of memory")

    unet, slow.pipe._unet_fn = slow.pipe._unet_fn, fail_once
    run_all(queue, [broken, fine])
    queue.close()
    error = broken.on_event.events[-1]["error"]
    assert (error.status, error.code) == (500, "internal_error") and "out of memory" in error.message
    assert fine.on_event.last == "done"


def test_closing_cancels_what_waits_and_ends_the_thread():
    slow = SlowPipe(delay=0.01)
    queue = GenerationQueue(slow.pipe, max_queue=8, max_batch=1)
    jobs = [job(slow.pipe, num_inference_steps=200) for _ in range(3)]
    for j in jobs:
        queue.submit(j)
    queue.start()
    while jobs[0].on_event.steps() == 0:
        time.sleep(0.01)
    queue.close()
    assert [j.on_event.last for j in jobs] == ["cancelled"] * 3
    assert not queue._thread.is_alive()


def test_nothing_of_an_answered_request_is_kept(slow):
    queue = GenerationQueue(slow.pipe, max_queue=8, max_batch=4)
    run_all(queue, [job(slow.pipe, seed=s, preview_every=1) for s in range(6)])
    queue.close()
    gc.collect()
    assert not [obj for obj in gc.get_objects() if type(obj) is Job]


# ---- over HTTP -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_server():
    """A server whose one worker takes 20 ms per step, with room for one waiting request."""
    slow = SlowPipe(delay=0.02)
    with serve_in_background(create_app(slow.pipe, ServeLimits(max_queue=1, max_batch=1))) as url:
        yield url, slow


def wait_until_idle(url: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        health = httpx.get(f"{url}/v1/health").json()
        if health["running"] == 0 and health["queued"] == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"the server was still busy after {timeout} s: {health}")


def test_a_full_queue_answers_429_with_retry_after(slow_server):
    url, _ = slow_server
    body = {"prompt": PROMPT, "num_inference_steps": 40}
    with httpx.Client(base_url=url, timeout=60) as client:
        answers: list[httpx.Response] = []
        first = threading.Thread(target=lambda: answers.append(client.post("/v1/generate", json=body)))
        first.start()
        while httpx.get(f"{url}/v1/health").json()["running"] == 0:
            time.sleep(0.01)
        second = threading.Thread(target=lambda: answers.append(client.post("/v1/generate", json=body)))
        second.start()
        while httpx.get(f"{url}/v1/health").json()["queued"] == 0:
            time.sleep(0.01)
        refused = client.post("/v1/generate", json=body)
        first.join()
        second.join()
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    assert [a.status_code for a in answers] == [200, 200]


def test_a_client_that_leaves_cancels_its_queued_or_running_request(slow_server):
    """200 steps take over 4 s; the client gives up after 0.5 s and the worker stops within about a second."""
    url, slow = slow_server
    wait_until_idle(url, 30)
    calls_before = slow.unet_calls
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 200},
                   timeout=httpx.Timeout(60, read=0.5))  # fmt: skip
    wait_until_idle(url, timeout=2.0)
    assert slow.unet_calls - calls_before < 100


def test_closing_the_stream_cancels_its_request(slow_server):
    url, slow = slow_server
    wait_until_idle(url, 30)
    calls_before = slow.unet_calls
    body = {"prompt": PROMPT, "num_inference_steps": 200}
    with httpx.stream("POST", f"{url}/v1/generate/stream", json=body, timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: progress"):
                break  # leave after the first step
    wait_until_idle(url, timeout=2.0)
    assert slow.unet_calls - calls_before < 100
