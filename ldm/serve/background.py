"""Serve an app from a thread of this process: for tests, benchmarks and notebooks.

with serve_in_background(create_app(pipe)) as url:
    requests.post(f"{url}/v1/generate", json={"prompt": "a red circle"})
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI


class GracefulServer(uvicorn.Server):
    """uvicorn's server, but a stop signal first cancels the app's generations, so their requests are answered
    (503 `cancelled`) while the connections are still open; uvicorn would otherwise wait out its grace period
    and cut them (a plain-text 500) before the app's lifespan ends and the queue closes."""

    def handle_exit(self, sig: int, frame: object) -> None:
        queue = getattr(getattr(self.config.app, "state", None), "queue", None)  # create_app's FastAPI app
        if queue is not None:
            queue.cancel_all()
        super().handle_exit(sig, frame)


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 60) -> Iterator[str]:
    """Serve `app` with uvicorn in a daemon thread (port 0: a free one); yields its base URL and stops the
    server (and so the app's generation thread) on exit."""
    server = GracefulServer(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="ldm-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port} within {timeout} s")
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
