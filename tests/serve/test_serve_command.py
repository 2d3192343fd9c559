"""`ldm serve` as a user runs it: a saved model folder, the printed URL, the page and the API; bad flags named."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.pipeline.tiny_models import tiny_pipeline

COMMAND = [sys.executable, "-m", "ldm"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return tiny_pipeline().save_pretrained(tmp_path_factory.mktemp("served") / "tiny-model")


def test_serve_prints_its_url_and_serves_the_folder_in_the_dtype_asked(model_folder):
    command = [
        *COMMAND,
        "serve",
        "--model",
        str(model_folder),
        "--port",
        "0",
        "--max-images",
        "2",
        "--dtype",
        "bfloat16",
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        url = re.fullmatch(rf"ldm serve: {re.escape(str(model_folder))} at (http://localhost:\d+)/\n", line)
        assert url is not None, line + server.stderr.read()
        base = url.group(1)
        health = wait_for_health(base)
        assert health == {"status": "ok", "queued": 0, "running": 0}
        info = httpx.get(f"{base}/v1/model").json()
        assert info["name"] == str(model_folder) and info["folder"] == str(model_folder.resolve())
        assert info["components"]["unet"] == ["diffusers", "UNet2DConditionModel"]
        assert info["limits"]["max_images"] == 2 and info["dtype"] == "bfloat16"
        assert "<title>ldm serve</title>" in httpx.get(base).text
        answer = httpx.post(
            f"{base}/v1/generate", json={"prompt": "a red circle", "num_inference_steps": 2}, timeout=60
        )
        assert answer.status_code == 200 and len(answer.json()["images"]) == 1
    finally:
        server.terminate()
        # uvicorn shuts down gracefully, then re-raises the signal, as a process stopped by it should end
        assert server.wait(timeout=30) == -signal.SIGTERM
        assert "Traceback" not in server.stderr.read()


def wait_for_health(base: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(f"{base}/v1/health").json()
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, "serve", *args], capture_output=True, text=True, timeout=120)


def test_a_missing_model_folder_is_named(tmp_path):
    result = run_serve("--model", str(tmp_path / "nothing"), "--port", "0")
    assert result.returncode == 2 and "nothing" in result.stderr and "Traceback" not in result.stderr


def test_a_port_in_use_is_named_before_the_model_loads(model_folder):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("--model", str(model_folder), "--port", str(port))
    assert result.returncode == 2 and f"--host/--port: cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize(("flag", "value"), [("--max-queue", "0"), ("--max-images", "-1"), ("--port", "70000")])
def test_a_bad_limit_is_named(model_folder, flag, value):
    result = run_serve("--model", str(model_folder), flag, value)
    assert result.returncode == 2 and f"{flag}: must be" in result.stderr
