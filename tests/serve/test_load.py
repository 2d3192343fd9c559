"""Load on a localhost server: 8 clients x 20 requests, every one answered with its own image, nothing kept; and
100 mixed clients (honest, slow, cancelling, hostile), each answered with an image or the API's JSON error.

The figures (latency, images/s, memory) are printed to the terminal; the quickstart model's are measured by
benchmarks/serve_load.py and written in the README.
"""

from __future__ import annotations

import gc
import os
import time

import pytest

from benchmarks.serve_abuse import run_mixed
from benchmarks.serve_load import resident_mb, run_load
from ldm.serve import ServeLimits, create_app, serve_in_background
from ldm.serve.security import ServeAccess
from ldm.serve.worker import Job
from tests.pipeline.tiny_models import tiny_pipeline


@pytest.fixture
def tiny_pipe_with_key():
    key = "key-of-the-load-test"
    return create_app(tiny_pipeline(), ServeLimits(), access=ServeAccess(api_key=key)), key


def test_eight_clients_times_twenty_requests_are_all_answered_and_nothing_is_kept(server_url, tiny_app, capsys):
    run_load(server_url, clients=8, requests_per_client=2, steps=4)  # warm-up
    before = resident_mb(os.getpid())
    report = run_load(server_url, clients=8, requests_per_client=20, steps=4)
    gc.collect()
    after = resident_mb(os.getpid())
    assert report.failures == [] and report.answered == 160
    assert tiny_app.state.queue.queued == 0 and tiny_app.state.queue.running == 0
    assert not [obj for obj in gc.get_objects() if type(obj) is Job]
    with capsys.disabled():
        print(
            f"\nload, tiny model, 8 clients x 20 requests of 4 steps: p50 {report.p50 * 1000:.0f} ms, "
            f"p95 {report.p95 * 1000:.0f} ms, {report.images_per_second:.1f} images/s, "
            f"{report.answered}/160 answered, resident memory {before:.0f} -> {after:.0f} MB (server and clients)"
        )


def test_a_hundred_mixed_clients_each_get_an_image_or_the_apis_json_error(tiny_pipe_with_key, capsys):
    """Honest, streaming, slow-reading, hanging-up and hostile clients at once, against a server with a key:
    every request is answered with its image or the API's JSON error (the cancelling clients aside), no 500s,
    every kind of client gets through, and the server is idle and holds no job afterwards."""
    app, key = tiny_pipe_with_key
    with serve_in_background(app) as url:
        report = run_mixed(url, clients=100, seconds=8, steps=4, key=key, slow_pause_s=0.01)
        gc.collect()
        queue = app.state.queue
        assert report.failures == [], report.failures[:10]
        codes = report.codes()
        assert codes["internal_error"] == 0 and codes["image"] > 0
        kinds_served = {kind for (kind, code) in report.outcomes if code == "image"}
        assert {"generate", "stream", "slow_stream"} <= kinds_served
        hostile = {code for (kind, code) in report.outcomes if kind == "hostile"}
        expected = {"unsupported_media_type", "bad_origin", "bad_host", "invalid_json", "unknown_field",
                    "invalid_value", "too_much_work", "body_too_large", "unauthorized"}  # fmt: skip
        assert expected <= hostile, expected - hostile
        deadline = time.monotonic() + 30
        while queue.queued or queue.running:  # the last cancelled calls stop at their next step
            assert time.monotonic() < deadline, (queue.queued, queue.running)
            time.sleep(0.05)
        assert queue.alive
    gc.collect()
    assert not [obj for obj in gc.get_objects() if type(obj) is Job]
    with capsys.disabled():
        print(f"\nmixed load, tiny model, 100 clients for 8 s: {report.requests} requests, {dict(codes)}")
