"""`ldm serve` as a user runs it: a saved model folder, the printed URL, the page and the API; bad flags named."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ldm.commands import CommandError
from ldm.commands.serve import api_key, serve_access
from tests.pipeline.tiny_models import tiny_pipeline

COMMAND = [sys.executable, "-m", "ldm"]
KEY = "key-of-the-command-tests"
ENV = {name: value for name, value in os.environ.items() if name != "LDM_API_KEY"}  # the caller's key is not ours


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
        "--max-work",
        "40000",
        "--deadline",
        "30",
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        line = server.stdout.readline()
        url = re.fullmatch(rf"ldm serve: {re.escape(str(model_folder))} at (http://localhost:\d+)/\n", line)
        assert url is not None, line + server.stderr.read()
        base = url.group(1)
        health = wait_for_health(base)
        assert health == {"status": "ok", "queued": 0, "running": 0}
        info = httpx.get(f"{base}/v1/model").json()
        assert info["name"] == model_folder.name and "folder" not in info  # its path is not the client's business
        assert info["components"]["unet"] == ["diffusers", "UNet2DConditionModel"]
        assert info["limits"]["max_images"] == 2 and info["dtype"] == "bfloat16"
        assert (info["limits"]["max_work"], info["limits"]["deadline_s"]) == (40000, 30.0)
        over = {"prompt": "a red circle", "num_inference_steps": 200, "num_images_per_prompt": 2}
        refused = httpx.post(f"{base}/v1/generate", json=over, timeout=60)  # 2 x 200 x 16 x 16 > 40000
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "too_much_work"
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
    return subprocess.run([*COMMAND, "serve", *args], capture_output=True, text=True, timeout=120, env=ENV)


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


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max-queue", "0"), ("--max-images", "-1"), ("--port", "70000"), ("--max-work", "0"), ("--deadline", "-1")],
)
def test_a_bad_limit_is_named(model_folder, flag, value):
    result = run_serve("--model", str(model_folder), flag, value)
    assert result.returncode == 2 and f"{flag}: must be" in result.stderr


# ---- access: the key, and who else may use the server ----------------------------------------------------


def test_listening_beyond_this_machine_without_a_key_is_refused(model_folder):
    result = run_serve("--model", str(model_folder), "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--host 0.0.0.0" in result.stderr and "--api-key-file FILE" in result.stderr
    assert "LDM_API_KEY" in result.stderr and "--api-key KEY" in result.stderr


@pytest.mark.parametrize("content", [None, "", "\n  \nsecond line"], ids=["missing", "empty", "blank-first-line"])
def test_a_key_file_without_a_key_is_named(model_folder, tmp_path, content):
    key_file = tmp_path / "key.txt"
    if content is not None:
        key_file.write_text(content)
    result = run_serve("--model", str(model_folder), "--host", "0.0.0.0", "--api-key-file", str(key_file))
    assert result.returncode == 2 and "--api-key-file: " in result.stderr and str(key_file) in result.stderr
    assert "Traceback" not in result.stderr


def test_a_key_and_a_key_file_together_are_refused(model_folder, tmp_path):
    result = run_serve("--model", str(model_folder), "--api-key", KEY, "--api-key-file", str(tmp_path / "k"))
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


def test_the_key_is_the_files_first_line_or_the_flag_or_the_environment(tmp_path, monkeypatch):
    (tmp_path / "key.txt").write_text(f"  {KEY} \nnot the key\n")
    monkeypatch.setenv("LDM_API_KEY", "from-the-environment")
    flags = argparse.Namespace(api_key=None, api_key_file=str(tmp_path / "key.txt"))
    assert api_key(flags) == KEY
    assert api_key(argparse.Namespace(api_key="from-the-flag", api_key_file=None)) == "from-the-flag"
    assert api_key(argparse.Namespace(api_key=None, api_key_file=None)) == "from-the-environment"
    monkeypatch.delenv("LDM_API_KEY")
    assert api_key(argparse.Namespace(api_key=None, api_key_file=None)) is None
    monkeypatch.setenv("LDM_API_KEY", " ")
    with pytest.raises(CommandError, match=r"^LDM_API_KEY is empty"):
        api_key(argparse.Namespace(api_key=None, api_key_file=None))


@pytest.mark.parametrize(
    ("hosts", "origins", "flag"),
    [(["myhost.lan:8000"], [], "--allow-host"), (["http://myhost.lan"], [], "--allow-host"),
     (["fe80::1%eth0"], [], "--allow-host"), (["localhost.."], [], "--allow-host"),
     ([], ["studio.example"], "--allow-origin"), ([], ["https://studio.example/page"], "--allow-origin")],
)  # fmt: skip
def test_a_malformed_allowed_host_or_origin_is_named(hosts, origins, flag):
    with pytest.raises(CommandError, match=f"^{flag}: "):
        serve_access("127.0.0.1", None, hosts, origins)


@pytest.mark.parametrize("host", ["::1]", "[[::1]]", "[127.0.0.1]", "localhost..", "0.0.0.0"])
def test_a_host_is_loopback_only_when_it_parses_as_a_loopback_address(host):
    """`::1]` once passed as ::1 (brackets stripped, not parsed): such a --host is not taken for this machine."""
    with pytest.raises(CommandError, match=r"needs an API key"):
        serve_access(host, None, [], [])


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST.", "127.0.0.2", "::1", "[::1]", "[0:0::1]"])
def test_every_spelling_of_a_loopback_host_needs_no_key(host):
    assert serve_access(host, None, [], []).allowed_hosts == ("localhost", "127.0.0.1", "[::1]")


def test_a_loopback_host_needs_no_key_and_a_named_host_is_answered_as_itself():
    assert serve_access("localhost", None, [], []).api_key is None
    access = serve_access("myhost.lan", KEY, ["Other.LAN"], ["https://Studio.example/"])
    assert access.allowed_hosts == ("myhost.lan", "other.lan") and access.allowed_origins == ("https://studio.example",)


def test_with_a_key_file_it_serves_the_network_and_every_api_call_needs_the_key(model_folder, tmp_path):
    (tmp_path / "key.txt").write_text(KEY + "\n")
    command = [*COMMAND, "serve", "--model", str(model_folder), "--host", "0.0.0.0", "--port", "0",
               "--api-key-file", str(tmp_path / "key.txt")]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        line = server.stdout.readline()
        port = re.fullmatch(rf"ldm serve: {re.escape(str(model_folder))} at http://0\.0\.0\.0:(\d+)/\n", line)
        assert port is not None, line + server.stderr.read()
        base = f"http://127.0.0.1:{port.group(1)}"
        assert wait_for_health(base)["status"] == "ok"  # supervisors probe health without the key
        assert "<title>ldm serve</title>" in httpx.get(base).text  # the page loads, to ask for the key
        refused = httpx.get(f"{base}/v1/model")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        with_key = {"Authorization": f"Bearer {KEY}"}
        assert httpx.get(f"{base}/v1/model", headers=with_key).json()["name"] == model_folder.name
        body = {"prompt": "a red circle", "num_inference_steps": 2}
        assert httpx.post(f"{base}/v1/generate", json=body, headers=with_key, timeout=60).status_code == 200
    finally:
        server.terminate()
        assert server.wait(timeout=30) == -signal.SIGTERM
        output = server.stdout.read() + server.stderr.read()
    assert KEY not in line + output and "Traceback" not in output


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--deadline", "nan", "--deadline: must be positive and finite"), ("--deadline", "inf", "--deadline: must"),
     ("--max-body-mb", "1e-9", "--max-body-mb: must allow at least 1 kB")],
)  # fmt: skip
def test_a_limit_that_would_switch_itself_off_is_named(model_folder, flag, value, message):
    result = run_serve("--model", str(model_folder), flag, value)
    assert result.returncode == 2 and message in result.stderr


def test_a_key_file_saved_with_a_byte_order_mark_holds_the_key_without_it(tmp_path):
    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n", encoding="utf-8-sig")
    assert api_key(argparse.Namespace(api_key=None, api_key_file=str(key_file))) == KEY


def test_a_stop_signal_answers_the_running_request_before_the_connections_close(model_folder):
    """SIGTERM mid-generation: the stream gets its `cancelled` event (uvicorn alone would wait out its grace
    period and cut the connection) and the process ends as a SIGTERM-stopped one should."""
    command = [*COMMAND, "serve", "--model", str(model_folder), "--port", "0", "--max-work", "10000000000"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        base = re.search(r"(http://\S+?)/?$", server.stdout.readline().strip()).group(1)
        wait_for_health(base)
        long = {"prompt": "a red circle", "num_inference_steps": 200, "num_images_per_prompt": 8}
        events = []
        with httpx.stream("POST", f"{base}/v1/generate/stream", json=long, timeout=60) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    events.append(line.removeprefix("event: "))
                    if events[-1] == "started":
                        server.send_signal(signal.SIGTERM)
        assert events[-1] == "cancelled", events[-3:]
        assert server.wait(timeout=30) == -signal.SIGTERM
    finally:
        server.kill()
        server.wait()


def test_an_ipv6_loopback_address_is_printed_in_brackets(model_folder):
    command = [*COMMAND, "serve", "--model", str(model_folder), "--host", "::1", "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        line = server.stdout.readline()
        url = re.search(r"at (http://\[::1\]:\d+)/$", line.strip())
        assert url is not None, line + server.stderr.read() if server.poll() is not None else line
        assert wait_for_health(url.group(1))["status"] == "ok"
    finally:
        server.terminate()
        server.wait(timeout=30)
