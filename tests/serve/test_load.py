"""Load on a localhost server: 8 clients x 20 requests, every one answered with its own image, nothing kept.

The figures (latency, images/s, memory) are printed to the terminal; the quickstart model's are measured by
benchmarks/serve_load.py and written in the README.
"""

from __future__ import annotations

import gc
import os

from benchmarks.serve_load import resident_mb, run_load
from ldm.serve.worker import Job


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
