"""The generation worker: one thread owns the pipeline and runs the queued requests, batching compatible ones.

Requests wait in a bounded queue (one more than `max_queue` is refused with `QueueFull`, which carries a
Retry-After estimate; `check_room` asks before the body is read). The worker takes the oldest request and every
waiting request with the same batch key (see `GenerationSpec.batch_key`) up to `max_batch` images, and samples
them in one pipeline call, each image from its own x_T, so a batched image is the image its request would get
alone. A cancelled request is dropped from the queue; a running call stops at its next step once every request
in it is cancelled or answered.

Budgets and failures:
- a request still unanswered `deadline_s` after it was submitted is answered 504 `deadline_exceeded`: when the
  worker reaches it in the queue, or at the next step of its call (the others of a batch go on);
- a batched call that fails is run again request by request, so only a request that fails alone gets the error
  (422 for a ValueError, 503 `out_of_memory`, else 500 with the traceback in the log);
- a worker thread killed by a bug outside a request answers the requests it held with 500 and is replaced, at
  most `MAX_RESTARTS` times in `RESTART_WINDOW_S`; after that the queue is unavailable (`alive` is False and
  every request is answered 503 `unavailable`) until the server restarts;
- events leave through the job's `on_event` callback, called on the worker thread; the app's is a bounded
  `ldm.serve.events.StreamEvents`, so a slow reader costs at most one waiting preview set.

The events of a job, in order:
    {"event": "started"}
    {"event": "progress", "step": k, "steps": n, "previews": [PIL image, ...] (only every preview_every steps)}
    then exactly one of
    {"event": "done", "images": [PIL image, ...]}
    {"event": "cancelled"}
    {"event": "error", "error": RequestError}
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from ldm.generation import GenerationRequest, LatentDiffusionPipeline
from ldm.serve.errors import RequestError, internal_error
from ldm.serve.requests import GenerationSpec, pipeline_error

logger = logging.getLogger(__name__)

MAX_RESTARTS = 3  # worker threads started again after a crash, within RESTART_WINDOW_S, before giving up
RESTART_WINDOW_S = 60.0
CANCELLED = {"event": "cancelled"}
OUT_OF_MEMORY = (torch.OutOfMemoryError, MemoryError)


class QueueFull(Exception):
    """The queue holds `max_queue` requests; `retry_after` is an estimate, in whole seconds, of when one leaves."""

    def __init__(self, retry_after: int, max_queue: int) -> None:
        super().__init__(f"the queue is full ({max_queue} requests waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """Raised from the step callback to stop a pipeline call none of whose requests is still wanted."""


@dataclass(eq=False)
class Job:
    """One request on its way through the queue."""

    spec: GenerationSpec
    on_event: Callable[[dict], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    answered: bool = False  # its done, error or cancelled event has been sent

    def cancel(self) -> None:
        """Stop waiting for this job: dropped if queued; its call stops once all of its batch is cancelled."""
        self.cancelled.set()

    def answer(self, event: dict) -> None:
        """Send the job's final event (done, error or cancelled); once: a job past its deadline is answered
        mid-call, and the end of the call must not answer it again."""
        if not self.answered:
            self.answered = True
            self.on_event(event)

    @property
    def wanted(self) -> bool:
        """Whether anyone still waits for this job's images."""
        return not self.answered and not self.cancelled.is_set()

    @property
    def timings(self) -> dict[str, float]:
        started = self.started or self.submitted
        sampling = (self.finished or started) - started
        return {"queued_s": round(started - self.submitted, 4), "sampling_s": round(sampling, 4)}


class GenerationQueue:
    """A bounded queue of jobs and the thread that runs them on `pipe`; `start()`, then `submit(job)`. A job
    unanswered `deadline_s` after its submission is answered 504."""

    def __init__(
        self, pipe: LatentDiffusionPipeline, max_queue: int, max_batch: int, deadline_s: float = 600.0
    ) -> None:
        self.pipe, self.max_queue, self.max_batch, self.deadline_s = pipe, max_queue, max_batch, deadline_s
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._condition = threading.Condition()
        self._closing = False
        self._thread = self._new_thread()
        self._restarts: deque[float] = deque()  # when the worker thread was last started again
        self._given_up = False  # crashed MAX_RESTARTS times within RESTART_WINDOW_S: no thread runs any more
        self._seconds_per_run = 1.0  # a running mean of a pipeline run's seconds, for Retry-After

    # ---- the server's side ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Cancel what waits, let the running call stop at its next step, and end the thread."""
        with self._condition:
            self._closing = True
            for job in (*self._waiting, *self._running):
                job.cancel()
            self._condition.notify_all()
        while True:  # a thread that crashes meanwhile hands over to a new one, which sees the closing
            thread = self._thread
            if thread.is_alive():
                thread.join()
            if thread is self._thread:
                return

    def submit(self, job: Job) -> int:
        """Queue `job`; returns its place (1 = next). QueueFull when `max_queue` jobs wait already, 503
        `unavailable` when no thread runs the queue (closing, or gave up)."""
        with self._condition:
            self._check_room()
            self._waiting.append(job)
            self._condition.notify()
            return len(self._waiting)

    def check_room(self, arriving: int = 0) -> None:
        """Raise what `submit` would refuse a job with now, counting `arriving` requests still being read and
        checked as waiting (QueueFull, or 503 unavailable); queues nothing."""
        with self._condition:
            self._check_room(arriving)

    def cancel_all(self) -> None:
        """Cancel every waiting and running job without waiting for the thread: a server about to stop answers
        them (503 cancelled) while its connections are still open."""
        with self._condition:
            for job in (*self._waiting, *self._running):
                job.cancel()
            self._drop_cancelled()

    def retry_after(self) -> int:
        """Whole seconds until about one waiting job leaves the queue: the worker takes the next batch when its
        running one ends, so one run's mean time (at least 1)."""
        return max(1, math.ceil(self._seconds_per_run))

    @property
    def alive(self) -> bool:
        """Whether a worker thread runs the queue (False before `start`, after `close`, and once it gave up)."""
        return not self._given_up and self._thread.is_alive()

    def unavailable(self) -> RequestError:
        """The 503 for a queue no thread runs."""
        reason = (
            f"it failed {MAX_RESTARTS + 1} times within {RESTART_WINDOW_S:g} s; see the server's log and restart it"
            if self._given_up
            else "the server is starting or stopping"
        )
        return RequestError(503, "unavailable", None, f"the generation worker is not running: {reason}")

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def _check_room(self, arriving: int = 0) -> None:
        started_and_dead = self._thread.ident is not None and not self._thread.is_alive()
        if self._closing or self._given_up or started_and_dead:  # nothing would ever answer the job
            raise self.unavailable()
        self._drop_cancelled()  # a client that hung up must not hold a place until the worker reaches its job
        if len(self._waiting) + arriving >= self.max_queue:
            raise QueueFull(self.retry_after(), self.max_queue)

    def _drop_cancelled(self) -> None:
        self._drop([job for job in self._waiting if job.cancelled.is_set()], CANCELLED)

    # ---- the worker thread ---------------------------------------------------------------------------

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._work_or_recover, name="ldm-generation", daemon=True)

    def _work_or_recover(self) -> None:
        try:
            self._work()
        except Exception as err:  # a bug outside a request: the requests' own failures are answered in _run
            logger.exception("the generation thread failed")
            self._recover(err)

    def _recover(self, err: Exception) -> None:
        """Answer the jobs the dead thread held (500) and start its successor, or give up: too many crashes in a
        short while are a bug a restart does not fix, and each one would fail the requests it holds."""
        now = time.monotonic()
        with self._condition:
            held, self._running = self._running, []
            while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
                self._restarts.popleft()
            if self._closing:
                self._drop(self._waiting, CANCELLED)
            elif len(self._restarts) < MAX_RESTARTS:
                self._restarts.append(now)
                self._thread = self._new_thread()
                self._thread.start()  # it waits for this lock
            else:
                logger.error("the generation thread failed %d times within %g s; not restarting it",
                             MAX_RESTARTS + 1, RESTART_WINDOW_S)  # fmt: skip
                self._given_up = True
                self._drop(self._waiting, {"event": "error", "error": self.unavailable()})
        for job in held:  # each one answered, whatever the others' callbacks do
            try:
                job.answer({"event": "error", "error": internal_error(err)})
            except Exception:
                logger.exception("answering a request the failed thread held")

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._closing:
                    self._condition.wait()
                if self._closing:
                    self._drop(self._waiting, CANCELLED)
                    return
                self._running = self._next_batch()
            if self._running:
                started = time.monotonic()
                self._run(self._running)
                self._seconds_per_run = 0.8 * self._seconds_per_run + 0.2 * (time.monotonic() - started)
            with self._condition:
                self._running = []

    def _next_batch(self) -> list[Job]:
        """The oldest live job and the waiting jobs that can share its call (under the lock). Jobs leave the
        queue only once the batch is chosen, so a failure here loses none."""
        self._drop_cancelled()
        self._drop([job for job in self._waiting if self._past_deadline(job)], self._deadline_exceeded())
        if not self._waiting:
            return []
        first = self._waiting[0]
        batch, images = [first], len(first.spec.seeds)
        key = first.spec.batch_key
        if key is not None:
            for job in itertools.islice(self._waiting, 1, None):
                if job.spec.batch_key == key and images + len(job.spec.seeds) <= self.max_batch:
                    batch.append(job)
                    images += len(job.spec.seeds)
        for job in batch:
            self._waiting.remove(job)
        return batch

    def _drop(self, jobs: list[Job] | deque[Job], event: dict) -> None:
        """Take `jobs` out of the queue, answering each with `event`."""
        for job in list(jobs):
            self._waiting.remove(job)
            job.answer(event)

    def _past_deadline(self, job: Job) -> bool:
        return time.monotonic() - job.submitted > self.deadline_s

    def _deadline_exceeded(self) -> dict:
        message = f"the request took longer than this server's {self.deadline_s:g} s (--deadline)"
        return {"event": "error", "error": RequestError(504, "deadline_exceeded", None, message)}

    def _run(self, jobs: list[Job]) -> None:
        """Sample `jobs` in one call and answer each; when a batch fails, each job is run again alone."""
        for job in jobs:
            job.started = time.monotonic()
            job.on_event({"event": "started"})
        try:
            images = self._sample(jobs)
        except Cancelled:
            for job in jobs:
                job.answer(CANCELLED)
            return
        except Exception as err:
            if len(jobs) == 1:
                jobs[0].answer({"event": "error", "error": failure_error(err)})
                return
            # One bad request (or one too many pixels) should not fail the requests it was batched with.
            logger.warning("a batch of %d requests failed (%s: %s); running each alone", len(jobs),
                           type(err).__name__, err)  # fmt: skip
            for job in jobs:
                self._run_alone(job)
            return
        self._deliver(jobs, images)

    def _run_alone(self, job: Job) -> None:
        """A job of a failed batch, sampled by itself: it gets its images, or its own error."""
        if not job.wanted:
            job.answer(CANCELLED)
            return
        try:
            images = self._sample_batch([job])
        except Cancelled:
            job.answer(CANCELLED)
        except Exception as err:
            job.answer({"event": "error", "error": failure_error(err)})
        else:
            self._deliver([job], images)

    def _sample(self, jobs: list[Job]) -> list[Image.Image]:
        if jobs[0].spec.batch_key is not None:
            return self._sample_batch(jobs)
        return self._sample_one_by_one(jobs[0])

    def _deliver(self, jobs: list[Job], images: list[Image.Image]) -> None:
        """Answer each job with its rows of `images` (a job answered or cancelled meanwhile gets none)."""
        start = 0
        for job in jobs:
            count = len(job.spec.seeds)
            job.finished = time.monotonic()
            job.answer(
                CANCELLED if job.cancelled.is_set() else {"event": "done", "images": images[start : start + count]}
            )
            start += count

    def _sample_batch(self, jobs: list[Job]) -> list[Image.Image]:
        """Deterministic text to image for all `jobs` in one call: image i of a job from x_T drawn alone with its
        seed on the CPU, as `ldm generate --seed` draws it."""
        r = jobs[0].spec.request
        negatives = [job.spec.request.negative_prompt for job in jobs for _ in job.spec.seeds]
        counts = [len(job.spec.seeds) for job in jobs]
        batch = replace(
            r,
            prompt=[job.spec.request.prompt for job in jobs for _ in job.spec.seeds],
            negative_prompt=None if not any(negatives) else [n or "" for n in negatives],
            seeds=tuple(seed for job in jobs for seed in job.spec.seeds),
            progress=False,
        )
        return self.pipe.generate(self._with_events(batch, jobs, counts)).images

    def _sample_one_by_one(self, job: Job) -> list[Image.Image]:
        """A stochastic sampler or image to image: each image its own call seeded with its own seed, as
        `ldm generate --seed` runs it (the sampler's step noise comes from that seed's generator)."""
        images = []
        for i, seed in enumerate(job.spec.seeds):
            one = replace(job.spec.request, seed=seed, progress=False)
            images += self.pipe.generate(self._with_events(one, [job], [1], call=i, calls=len(job.spec.seeds))).images
        return images

    def _with_events(
        self, request: GenerationRequest, jobs: list[Job], counts: list[int], call: int = 0, calls: int = 1
    ) -> GenerationRequest:
        """`request` with callbacks that, after each step, answer the jobs past their deadline, stop the call when
        no job is still wanted, else tell each wanted job its progress over all `calls` calls and hand it its rows
        of the previews (every job of a batch asks for the same preview_every). Job j owns the next counts[j] rows
        of the call's batch."""
        ends = list(itertools.accumulate(counts))
        rows = [slice(end - count, end) for count, end in zip(counts, ends, strict=True)]
        steps = jobs[0].spec.steps_run  # every job of a call runs the same steps
        previews: dict[int, list[Image.Image]] = {}

        def on_preview(step: int, images: list[Image.Image]) -> None:
            previews[step] = images

        def on_step(step: int, t: int, latents: torch.Tensor, pred_x0: torch.Tensor) -> None:
            for job in jobs:
                if job.wanted and self._past_deadline(job):
                    job.answer(self._deadline_exceeded())
            if not any(job.wanted for job in jobs):
                raise Cancelled
            images = previews.pop(step, None)
            for job, row in zip(jobs, rows, strict=True):
                if not job.wanted:
                    continue
                event = {"event": "progress", "step": call * steps + step + 1, "steps": calls * steps}
                if images is not None:
                    event["previews"] = images[row]
                job.on_event(event)

        wants_previews = request.preview_every > 0
        return replace(request, callback=on_step, on_preview=on_preview if wants_previews else None)


def failure_error(err: Exception) -> RequestError:
    """A failed call as the client's error: 422 for an argument only the pipeline could judge, 503 when memory
    ran out (fewer images or pixels may fit), else 500 with the traceback in the server's log."""
    if isinstance(err, ValueError):
        return pipeline_error(err)
    if isinstance(err, OUT_OF_MEMORY):
        logger.error("generation ran out of memory: %s", err)
        message = (
            f"the server ran out of memory drawing this request ({type(err).__name__}); ask for fewer images or pixels"
        )
        return RequestError(503, "out_of_memory", None, message)
    logger.error("generation failed", exc_info=err)
    return internal_error(err)
