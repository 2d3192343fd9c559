"""The generation worker: one thread owns the pipeline and runs the queued requests, batching compatible ones.

Requests wait in a bounded queue (one more than `max_queue` is refused with `QueueFull`, which carries a
Retry-After estimate). The worker takes the oldest request and every waiting request with the same batch key
(see `GenerationSpec.batch_key`) up to `max_batch` images, and samples them in one pipeline call, each image
from its own x_T, so a batched image is the image its request would get alone. A cancelled request is
dropped from the queue; a running call stops at its next step once every request in it is cancelled.

Events reach each job through its `on_event` callback, called on the worker thread:
    {"event": "started"}
    {"event": "progress", "step": k, "steps": n, "previews": [PIL image, ...] (only every preview_every steps)}
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
from ldm.serve.requests import GenerationSpec, RequestError, pipeline_error

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` requests; `retry_after` is an estimate, in whole seconds, of when one leaves."""

    def __init__(self, retry_after: int, max_queue: int) -> None:
        super().__init__(f"the queue is full ({max_queue} requests waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """Raised from the step callback to stop a pipeline call whose every request was cancelled."""


@dataclass(eq=False)
class Job:
    """One request on its way through the queue."""

    spec: GenerationSpec
    on_event: Callable[[dict], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None

    def cancel(self) -> None:
        """Stop waiting for this job: dropped if queued; its call stops once all of its batch is cancelled."""
        self.cancelled.set()

    @property
    def timings(self) -> dict[str, float]:
        started = self.started or self.submitted
        sampling = (self.finished or started) - started
        return {"queued_s": round(started - self.submitted, 4), "sampling_s": round(sampling, 4)}


class GenerationQueue:
    """A bounded queue of jobs and the thread that runs them on `pipe`; `start()`, then `submit(job)`."""

    def __init__(self, pipe: LatentDiffusionPipeline, max_queue: int, max_batch: int) -> None:
        self.pipe, self.max_queue, self.max_batch = pipe, max_queue, max_batch
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._condition = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="ldm-generation", daemon=True)
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
        self._thread.join()

    def submit(self, job: Job) -> int:
        """Queue `job`; returns its place (1 = next). QueueFull when `max_queue` jobs wait already."""
        with self._condition:
            if self._closing:
                raise RuntimeError("the generation queue is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(self.retry_after(), self.max_queue)
            self._waiting.append(job)
            self._condition.notify()
            return len(self._waiting)

    def retry_after(self) -> int:
        """Whole seconds until about one waiting job leaves the queue: the worker takes the next batch when its
        running one ends, so one run's mean time (at least 1)."""
        return max(1, math.ceil(self._seconds_per_run))

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- the worker thread ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._closing:
                    self._condition.wait()
                if self._closing:
                    self._drop(self._waiting)
                    return
                self._running = self._next_batch()
            if self._running:
                started = time.monotonic()
                self._run(self._running)
                self._seconds_per_run = 0.8 * self._seconds_per_run + 0.2 * (time.monotonic() - started)
            with self._condition:
                self._running = []

    def _next_batch(self) -> list[Job]:
        """The oldest live job and the waiting jobs that can share its call (under the lock)."""
        self._drop([job for job in self._waiting if job.cancelled.is_set()])
        if not self._waiting:
            return []
        first = self._waiting.popleft()
        batch, images = [first], len(first.spec.seeds)
        key = first.spec.batch_key
        if key is not None:
            for job in list(self._waiting):
                if job.spec.batch_key == key and images + len(job.spec.seeds) <= self.max_batch:
                    self._waiting.remove(job)
                    batch.append(job)
                    images += len(job.spec.seeds)
        return batch

    def _drop(self, jobs: list[Job] | deque[Job]) -> None:
        for job in list(jobs):
            self._waiting.remove(job)
            job.on_event({"event": "cancelled"})

    def _run(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.started = time.monotonic()
            job.on_event({"event": "started"})
        try:
            if jobs[0].spec.batch_key is not None:
                images = self._sample_batch(jobs)
            else:
                images = self._sample_one_by_one(jobs[0])
        except Cancelled:
            for job in jobs:
                job.on_event({"event": "cancelled"})
            return
        except ValueError as err:  # an argument only the pipeline could judge; the request's to fix
            for job in jobs:
                job.on_event({"event": "error", "error": pipeline_error(err)})
            return
        except Exception as err:
            logger.exception("generation failed")
            error = RequestError(500, "internal_error", None, f"generation failed: {type(err).__name__}: {err}")
            for job in jobs:
                job.on_event({"event": "error", "error": error})
            return
        start = 0
        for job in jobs:
            count = len(job.spec.seeds)
            job.finished = time.monotonic()
            if job.cancelled.is_set():
                job.on_event({"event": "cancelled"})
            else:
                job.on_event({"event": "done", "images": images[start : start + count]})
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
        """`request` with callbacks that, after each step, stop the call when every job is cancelled, else tell
        each job its progress over all `calls` calls and hand it its rows of the previews (every job of a batch
        asks for the same preview_every). Job j owns the next counts[j] rows of the call's batch."""
        ends = list(itertools.accumulate(counts))
        rows = [slice(end - count, end) for count, end in zip(counts, ends, strict=True)]
        steps = jobs[0].spec.steps_run  # every job of a call runs the same steps
        previews: dict[int, list[Image.Image]] = {}

        def on_preview(step: int, images: list[Image.Image]) -> None:
            previews[step] = images

        def on_step(step: int, t: int, latents: torch.Tensor, pred_x0: torch.Tensor) -> None:
            if all(job.cancelled.is_set() for job in jobs):
                raise Cancelled
            images = previews.pop(step, None)
            for job, row in zip(jobs, rows, strict=True):
                if job.cancelled.is_set():
                    continue
                event = {"event": "progress", "step": call * steps + step + 1, "steps": calls * steps}
                if images is not None:
                    event["previews"] = images[row]
                job.on_event(event)

        wants_previews = request.preview_every > 0
        return replace(request, callback=on_step, on_preview=on_preview if wants_previews else None)
