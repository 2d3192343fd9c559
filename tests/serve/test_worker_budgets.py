"""What one request may cost the server: a deadline, previews only for a stream that receives them, a stream read
late that holds one preview set, a batch that one bad request does not fail, a worker that comes back after a
crash (or says it is gone), and a full queue that refuses before it reads the body."""

from __future__ import annotations

import gc
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
import torch
from PIL import Image

from ldm.serve import ServeLimits, create_app, serve_in_background
from ldm.serve.worker import GenerationQueue
from tests.pipeline.tiny_models import tiny_pipeline
from tests.serve.test_queue import PROMPT, SlowPipe, job, run_all

LONG = {"prompt": "hold the worker", "num_inference_steps": 200}


@pytest.fixture
def slow():
    return SlowPipe()


@contextmanager
def served(pipe, limits: ServeLimits | None = None) -> Iterator[tuple]:
    """The app of `pipe` on a local port, and a client of it."""
    app = create_app(pipe, limits or ServeLimits())
    with serve_in_background(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield app, client


@contextmanager
def worker_held(client: httpx.Client) -> Iterator[None]:
    """The worker busy with a long streamed request until the block ends (closing the stream cancels it)."""
    with client.stream("POST", "/v1/generate/stream", json=LONG) as stream:
        for line in stream.iter_lines():
            if line == "event: started":
                break
        yield


class Posts:
    """POSTs to /v1/generate, each on its own thread, so that they wait in the queue together."""

    def __init__(self, client: httpx.Client, bodies: list[dict]) -> None:
        self.answers: list[httpx.Response | None] = [None] * len(bodies)
        self.threads = [threading.Thread(target=self._post, args=(client, i, b)) for i, b in enumerate(bodies)]
        for thread in self.threads:
            thread.start()

    def _post(self, client: httpx.Client, i: int, body: dict) -> None:
        self.answers[i] = client.post("/v1/generate", json=body)

    def join(self) -> list[httpx.Response]:
        for thread in self.threads:
            thread.join(60)
        return self.answers


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {timeout} s"
        time.sleep(0.01)


def queued(client: httpx.Client) -> int:
    return client.get("/v1/health").json()["queued"]


def idle(client: httpx.Client) -> bool:
    health = client.get("/v1/health").json()
    return health["queued"] == health["running"] == 0


def poison(pipe, error: type[Exception] = RuntimeError, message: str = "broke on this prompt") -> None:
    """Make `pipe` raise `error(message)` in any call whose prompts include the word poison."""
    conditioning = pipe._text_conditioning

    def poisoned(prompt, *args, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if any("poison" in p for p in prompts):
            raise error(message)
        return conditioning(prompt, *args, **kwargs)

    pipe._text_conditioning = poisoned


def error_of(answer: httpx.Response) -> tuple[int, str]:
    return answer.status_code, answer.json()["error"]["code"]


def pil_images_alive() -> int:
    gc.collect()
    return sum(type(obj) is Image.Image for obj in gc.get_objects())


def parse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        kind, data = block.split("\n", 1)
        events.append((kind.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


# ---- the deadline ----------------------------------------------------------------------------------------


def test_requests_past_the_deadline_are_answered_504_queued_or_running():
    """200 steps take over 4 s; with a 1 s deadline the running stream and the request queued behind it are
    both answered 504, and the worker stops early."""
    slow = SlowPipe(delay=0.02)
    with served(slow.pipe, ServeLimits(max_batch=1, deadline_s=1.0)) as (_, client):
        with client.stream("POST", "/v1/generate/stream", json=LONG) as stream:
            lines = stream.iter_lines()
            while next(lines) != "event: started":
                pass
            next(lines)  # its data line
            waiting = client.post("/v1/generate", json=LONG)
            running = parse_events("\n".join(lines))
        wait_for(lambda: idle(client), timeout=5)
    assert error_of(waiting) == (504, "deadline_exceeded")
    assert "1 s (--deadline)" in waiting.json()["error"]["message"]
    assert running[-1][0] == "error" and running[-1][1]["error"]["code"] == "deadline_exceeded"
    assert slow.unet_calls < 200  # both requests together ran fewer steps than one would alone


def test_a_job_past_its_deadline_in_the_queue_is_answered_unsampled():
    slow = SlowPipe()
    queue = GenerationQueue(slow.pipe, max_queue=8, max_batch=8, deadline_s=0.05)
    jobs = [job(slow.pipe, seed=1), job(slow.pipe, seed=2)]
    for j in jobs:
        queue.submit(j)
    time.sleep(0.1)
    queue.start()
    for j in jobs:
        assert j.on_event.finished.wait(30)
    queue.close()
    assert [j.on_event.events[-1]["error"].status for j in jobs] == [504, 504]
    assert slow.unet_calls == 0


def test_a_batched_job_past_its_deadline_is_answered_while_its_batch_mate_goes_on():
    slow = SlowPipe()
    queue = GenerationQueue(slow.pipe, max_queue=8, max_batch=8, deadline_s=60)
    late, on_time = job(slow.pipe, seed=1, num_inference_steps=20), job(slow.pipe, seed=2, num_inference_steps=20)
    record = late.on_event

    def expire_once_started(event: dict) -> None:
        record(event)
        if event["event"] == "started":
            late.submitted -= 60  # its deadline passes as its call begins

    late.on_event = expire_once_started

    queue.submit(late)
    queue.submit(on_time)
    queue.start()
    assert record.finished.wait(30) and on_time.on_event.finished.wait(30)
    queue.close()
    assert [e["event"] for e in record.events] == ["started", "error"]
    assert record.events[-1]["error"].code == "deadline_exceeded"
    assert on_time.on_event.last == "done" and on_time.on_event.steps() == 20
    assert slow.batches == [2]


# ---- previews only where they are streamed ---------------------------------------------------------------


def test_a_json_answer_decodes_no_previews_and_batches_with_requests_that_ask_none():
    slow = SlowPipe(delay=0.01)
    decoded: list[int] = []
    decode = slow.pipe.decode
    slow.pipe.decode = lambda latents: decoded.append(len(latents)) or decode(latents)
    bodies = [{"prompt": PROMPT, "num_inference_steps": 4, "seed": 1, "preview_every": 1},
              {"prompt": PROMPT, "num_inference_steps": 4, "seed": 2}]  # fmt: skip
    with served(slow.pipe) as (_, client):
        with worker_held(client):
            posts = Posts(client, bodies)
            wait_for(lambda: queued(client) == 2)
        answers = posts.join()
    assert [answer.status_code for answer in answers] == [200, 200]
    assert slow.batches[1:] == [2]  # one call for both (the first is the cancelled holder)
    assert decoded == [2]  # the images; no preview


def test_a_stream_read_late_holds_one_preview_set_and_still_ends_with_done():
    """60 steps of four 128x128 noise previews (~16 MB of base64) to a client that reads nothing until the worker
    is done: the server keeps the newest previews, not every step's, and the stream still ends with done."""
    pipe = tiny_pipeline()
    pipe._unet_fn = lambda x, *args, **kwargs: torch.randn_like(x)
    pipe.decode = lambda latents: torch.rand(len(latents), 3, 128, 128) * 2 - 1  # PNGs that do not compress
    steps, images = 60, 4
    body = {"prompt": PROMPT, "num_inference_steps": steps, "num_images_per_prompt": images, "preview_every": 1}
    small_window = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)])
    with served(pipe) as (_, client), httpx.Client(base_url=client.base_url, transport=small_window) as reader:
        images_before = pil_images_alive()
        with reader.stream("POST", "/v1/generate/stream", json=body, timeout=60) as stream:
            wait_for(lambda: idle(client))  # the worker is done; the client has read nothing yet
            held = pil_images_alive() - images_before
            events = parse_events(stream.read().decode())
    progress = [data for kind, data in events if kind == "progress"]
    previews = [data["step"] for data in progress if "previews" in data]
    assert held <= 3 * images  # the waiting preview set, the one being sent, and the finished images
    assert len(previews) < steps - 1 and previews == sorted(previews)
    assert progress[-1]["step"] == steps and events[-1][0] == "done" and len(events[-1][1]["images"]) == images


# ---- one bad request in a batch --------------------------------------------------------------------------


def test_a_request_that_breaks_its_batch_gets_the_error_and_the_others_their_own_images():
    slow = SlowPipe(delay=0.01)
    poison(slow.pipe)
    bodies = [{"prompt": prompt, "num_inference_steps": 4, "seed": seed}
              for prompt, seed in (("a blue square", 1), ("poison", 2), ("a red circle", 3))]  # fmt: skip
    with served(slow.pipe) as (_, client):
        with worker_held(client):
            posts = Posts(client, bodies)
            wait_for(lambda: queued(client) == 3)
        answers = posts.join()
        alone = [client.post("/v1/generate", json=bodies[i]) for i in (0, 2)]
    assert [answer.status_code for answer in answers] == [200, 500, 200]
    assert error_of(answers[1]) == (500, "internal_error") and "broke on this prompt" in answers[1].text
    assert slow.batches[1:] == [3, 1, 1, 1, 1, 1]  # the batch, each of it again alone, then the two alone
    for batched, single in zip((answers[0], answers[2]), alone, strict=True):
        assert batched.json()["images"] == single.json()["images"]


@pytest.mark.parametrize(
    ("error", "message", "status", "code"),
    [
        (RuntimeError, "a bug", 500, "internal_error"),
        (ValueError, "guidance_scale: not for this prompt", 422, "invalid_value"),
        (torch.OutOfMemoryError, "CUDA out of memory", 503, "out_of_memory"),
    ],
)
def test_a_job_that_fails_alone_gets_its_own_error(error, message, status, code):
    slow = SlowPipe()
    poison(slow.pipe, error, message)
    queue = GenerationQueue(slow.pipe, max_queue=8, max_batch=8)
    jobs = [job(slow.pipe, seed=1), job(slow.pipe, prompt="poison", seed=2), job(slow.pipe, seed=3)]
    run_all(queue, jobs)
    queue.close()
    assert [j.on_event.last for j in jobs] == ["done", "error", "done"]
    failed = jobs[1].on_event.events[-1]["error"]
    assert (failed.status, failed.code) == (status, code)
    assert slow.batches == [3, 1, 1, 1]


# ---- a worker that dies ----------------------------------------------------------------------------------


def test_a_worker_thread_that_dies_outside_a_request_is_restarted(caplog):
    with served(tiny_pipeline()) as (app, client):
        queue = app.state.queue
        next_batch = queue._next_batch

        def fail_once():
            queue._next_batch = next_batch
            raise RuntimeError("a bug in choosing the batch")

        queue._next_batch = fail_once
        answer = client.post("/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 2}, timeout=15)
        health = client.get("/v1/health")
    assert answer.status_code == 200, answer.text
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert "a bug in choosing the batch" in caplog.text


def test_a_worker_that_keeps_dying_leaves_the_server_unavailable():
    with served(tiny_pipeline()) as (app, client):

        def always_fail():
            raise RuntimeError("a bug in choosing the batch")

        app.state.queue._next_batch = always_fail
        body = {"prompt": PROMPT, "num_inference_steps": 2}
        waiting = client.post("/v1/generate", json=body, timeout=15)
        health = client.get("/v1/health")
        later = client.post("/v1/generate", json=body, timeout=15)
    for answer in (waiting, health, later):
        assert error_of(answer) == (503, "unavailable")
    assert "restart" in health.json()["error"]["message"]


def test_the_jobs_a_dying_worker_held_get_500_and_the_next_are_served(slow):
    queue = GenerationQueue(slow.pipe, max_queue=8, max_batch=1)
    run = queue._run

    def crash_once(jobs):
        queue._run = run
        raise RuntimeError("a bug outside the pipeline call")

    queue._run = crash_once
    held, after = job(slow.pipe, seed=1), job(slow.pipe, seed=2)
    run_all(queue, [held, after])
    assert queue.alive
    queue.close()
    error = held.on_event.events[-1]["error"]
    assert (error.status, error.code) == (500, "internal_error") and "a bug outside" in error.message
    assert after.on_event.last == "done" and not queue.alive


# ---- a full queue, and what /v1/model says -----------------------------------------------------------------


@contextmanager
def body_sent_slowly(url: httpx.URL, declared: int = 2000, first: bytes = b'{"prompt": "a') -> Iterator[socket.socket]:
    """A POST to /v1/generate whose headers and `first` bytes are sent, the rest of its `declared` body never."""
    with socket.create_connection((url.host, url.port), timeout=30) as connection:
        head = (
            f"POST /v1/generate HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
        )
        connection.sendall(head.encode() + first)
        yield connection


def status_line_after_headers_alone(url: httpx.URL, declared: int) -> str:
    """The status line a POST /v1/generate is answered with when only its headers and 1 kB of its `declared`
    bytes of body have been sent."""
    with body_sent_slowly(url, declared, first=b" " * 1024) as connection:
        return connection.recv(4096).split(b"\r\n", 1)[0].decode()


def test_a_full_queue_answers_429_before_reading_the_body():
    slow = SlowPipe(delay=0.02)
    with (
        served(slow.pipe, ServeLimits(max_queue=1, max_batch=1)) as (_, client),
        worker_held(client),
        client.stream("POST", "/v1/generate/stream", json=LONG),  # waits: the queue is full
    ):
        wait_for(lambda: queued(client) == 1)
        status = status_line_after_headers_alone(client.base_url, 7 * 2**20)
    assert status.split()[1] == "429"


def test_the_model_info_names_the_work_cap_and_the_deadline(server_url, tiny_app):
    limits = httpx.get(f"{server_url}/v1/model").json()["limits"]
    pipe = tiny_app.state.queue.pipe
    assert limits["max_work"] == 8 * pipe.default_size**2 * 200  # a full batch of default images, most steps
    assert limits["deadline_s"] == 600.0


def test_at_most_max_decoding_bodies_are_checked_at_once(monkeypatch):
    """Each body being checked may hold a decoded upload: however many arrive together, two are at a time."""
    import ldm.serve.app

    checking, most = 0, 0
    lock = threading.Lock()
    resolve = ldm.serve.app.resolve_request

    def slow_resolve(*args, **kwargs):
        nonlocal checking, most
        with lock:
            checking += 1
            most = max(most, checking)
        time.sleep(0.2)
        with lock:
            checking -= 1
        return resolve(*args, **kwargs)

    monkeypatch.setattr(ldm.serve.app, "resolve_request", slow_resolve)
    with served(tiny_pipeline(), ServeLimits(max_decoding=2)) as (_app, client):
        posts = Posts(client, [{"prompt": PROMPT, "num_inference_steps": 2, "seed": i} for i in range(6)])
        answers = posts.join()
    assert [answer.status_code for answer in answers] == [200] * 6
    assert most == 2


def test_a_body_that_does_not_arrive_in_time_is_answered_408():
    with served(tiny_pipeline(), ServeLimits(body_timeout_s=0.5)) as (_, client):
        with body_sent_slowly(client.base_url) as connection:
            answer = connection.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 408") and '"code":"body_timeout"' in answer


def test_bodies_still_arriving_hold_their_places_in_the_queue():
    """max_queue bounds the requests waiting plus those whose bodies are being read, so slow senders cannot
    make the server hold more than max_queue bodies."""
    with served(tiny_pipeline(), ServeLimits(max_queue=1)) as (_, client):
        with body_sent_slowly(client.base_url):
            time.sleep(0.3)  # its headers are in: it is reading the body
            answer = client.post("/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 2})
        assert error_of(answer) == (429, "queue_full")
        # once the slow sender has gone (the server notices its hang-up), its place is free again
        wait_for(lambda: client.post("/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 2}).is_success)


def test_a_bug_in_the_app_is_answered_as_the_apis_json_error(monkeypatch):
    import ldm.serve.app

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(ldm.serve.app, "resolve_request", broken)
    with served(tiny_pipeline()) as (_, client):
        answer = client.post("/v1/generate", json={"prompt": PROMPT})
    assert error_of(answer) == (500, "internal_error") and "KeyError" in answer.json()["error"]["message"]


def test_a_queue_whose_thread_is_gone_refuses_new_requests(slow):
    """A thread that ended without a restart (a BaseException, say) answers no one: submits are refused 503."""
    queue = GenerationQueue(slow.pipe, max_queue=4, max_batch=1)
    gone = threading.Thread(target=lambda: None)
    gone.start()
    gone.join()
    queue._thread = gone
    with pytest.raises(Exception) as refused:
        queue.submit(job(slow.pipe))
    assert getattr(refused.value, "code", None) == "unavailable" and queue.queued == 0


def test_cancel_all_answers_the_waiting_at_once(slow):
    queue = GenerationQueue(slow.pipe, max_queue=4, max_batch=1)  # not started
    waiting = [job(slow.pipe), job(slow.pipe)]
    for j in waiting:
        queue.submit(j)
    queue.cancel_all()
    assert [j.on_event.last for j in waiting] == ["cancelled", "cancelled"] and queue.queued == 0
