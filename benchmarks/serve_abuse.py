"""Mixed clients against `ldm serve`: honest, hostile, slow-reading and cancelling ones at once, for a stated time.

Every request is classified by what came back: an image (200 with the image asked for), the API's JSON error
(by its code), a deliberate hang-up (the client cancelled), or a failure: no answer, or an answer that is
neither the API's JSON nor an image. The server's peak memory (VmHWM) is compared with its idle memory plus
twice what one full batch needs, measured alone first on the same server.

Used by benchmarks/serve_load.py (`--mixed-clients`) and by tests/serve/test_load.py on the tiny model.
"""

from __future__ import annotations

import base64
import io
import json
import random
import socket
import statistics
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from PIL import Image

from ldm.serve.images import PNG_SIGNATURE, png_chunk
from ldm.serve.png import read_generation_settings

PROMPT = "a red circle on a white background"
HONEST_KINDS = ("generate", "stream")
KINDS = ("generate", "stream", "slow_stream", "cancel", "hostile")
# A bad input that is still a valid image: its text chunk is dropped unread, so the answer may be an image.
VALID_IMAGES = ("zTXt bomb",)


@dataclass
class MixedReport:
    """What the mixed clients saw, request by request."""

    outcomes: Counter = field(default_factory=Counter)  # (kind, "image" | error code | "left") -> count
    failures: list[str] = field(default_factory=list)  # no answer, or neither JSON error nor image
    latencies: list[float] = field(default_factory=list)  # seconds, honest requests answered with an image
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values()) + len(self.failures)

    def codes(self) -> Counter:
        """Answers by what they were: "image", an error code, or "left" (the client hung up on purpose)."""
        by_code: Counter = Counter()
        for (_, code), count in self.outcomes.items():
            by_code[code] += count
        return by_code


def ztxt_bomb_png(side: int = 16, inflated_mb: int = 64) -> bytes:
    """A valid small RGB PNG whose zTXt chunk inflates to `inflated_mb` MB of zeros."""
    compressor, zeros = zlib.compressobj(9), bytes(2**20)
    text = b"".join(compressor.compress(zeros) for _ in range(inflated_mb)) + compressor.flush()
    raw = b"".join(b"\x00" + bytes(3 * side) for _ in range(side))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"zTXt", b"Comment\x00\x00" + text)
        + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")
    )  # fmt: skip


def animated_png(side: int = 16) -> bytes:
    frames = [Image.new("RGB", (side, side), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="PNG", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


Send = Callable[[httpx.Client], httpx.Response]


def hostile_requests(url: str, key: str | None, steps: int) -> list[tuple[str, Send]]:
    """(name, send) of each bad request the hostile clients take turns sending; send(http) returns the answer."""
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    json_type = {"Content-Type": "application/json"} | auth
    body = {"prompt": PROMPT, "num_inference_steps": steps}

    def image_body(png: bytes) -> bytes:
        return json.dumps(body | {"image": base64.b64encode(png).decode(), "strength": 0.5}).encode()

    def post(**kwargs) -> Send:
        return lambda http: http.post("/v1/generate", **kwargs)

    # twice the model's side (within the server's 4x) at the most steps and images: 4x the default work cap
    info = httpx.get(f"{url}/v1/model", headers=auth).json()
    side, limits = 2 * info["default_size"], info["limits"]
    too_much = body | {"num_images_per_prompt": limits["max_images"], "num_inference_steps": limits["max_steps"],
                       "height": side, "width": side}  # fmt: skip
    bad = [
        ("text/plain body", post(content=json.dumps(body), headers=auth | {"Content-Type": "text/plain"})),
        ("form body", post(data={"prompt": PROMPT}, headers=auth)),
        ("foreign Origin", post(json=body, headers=auth | {"Origin": "http://evil.example"})),
        ("foreign Host", lambda http: http.get("/v1/model", headers=auth | {"Host": "evil.example"})),
        ("bad JSON", post(content=b"{", headers=json_type)),
        ("JSON nested 5000 deep", post(content=b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", headers=json_type)),
        ("an int of 5000 digits", post(content=b'{"prompt": "a", "seed": ' + b"1" * 5000 + b"}", headers=json_type)),
        ("unknown field", post(json=body | {"guidance": 3}, headers=auth)),
        ("zTXt bomb", post(content=image_body(ztxt_bomb_png()), headers=json_type)),
        ("animated PNG", post(content=image_body(animated_png()), headers=json_type)),
        ("not an image", post(content=image_body(b"GIF89a" + bytes(64)), headers=json_type)),
        ("too much work", post(json=too_much, headers=auth)),
        ("body too large", lambda http: declared_body_too_large(url, auth)),
    ]
    if key:
        bad += [("wrong key", post(json=body, headers={"Authorization": "Bearer not-the-key"})),
                ("no key", post(json=body))]  # fmt: skip
    return bad


def post_head(url: str, path: str, length: int, headers: dict) -> bytes:
    """The head of a JSON POST of `length` bytes to `path`, for clients that speak HTTP over a raw socket."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {urlsplit(url).netloc}", "Content-Type: application/json",
             f"Content-Length: {length}", "Connection: close"]  # fmt: skip
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def declared_body_too_large(url: str, headers: dict) -> httpx.Response:
    """Declare a 9 MB body and send none of it: the server must answer 413 without waiting for it."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(post_head(url, "/v1/generate", 9 * 2**20, headers))
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
    status_line, _, rest = bytes(received).partition(b"\r\n")
    content = rest.partition(b"\r\n\r\n")[2]
    return httpx.Response(int(status_line.split()[1]), content=content)


def classify(answer: httpx.Response) -> str | None:
    """The API error code of a refusal, or None when the answer is not the API's JSON error."""
    try:
        error = answer.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    return error.get("code") if isinstance(error, dict) and isinstance(error.get("code"), str) else None


def image_problem(answer: httpx.Response, seed: int) -> str | None:
    """What is wrong with a 200 answer to the honest request of `seed`, or None."""
    images = answer.json()["images"]
    if len(images) != 1 or images[0]["seed"] != seed:
        return f"asked for seed {seed}, got {[image['seed'] for image in images]}"
    settings = read_generation_settings(base64.b64decode(images[0]["png_base64"]))
    return None if settings["seed"] == seed else f"the PNG says seed {settings['seed']}, asked for {seed}"


def parse_events(text: str) -> list[tuple[str, str]]:
    events = []
    for block in text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in lines:
            events.append((lines["event"], lines.get("data", "")))
    return events


def slow_stream(url: str, headers: dict, body: dict, bytes_per_read: int, pause_s: float, timeout: float) -> str:
    """POST a stream over a raw socket with a small receive buffer and read it `bytes_per_read` at a time with
    `pause_s` between reads, so the server's sends block; returns the whole answer as text."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(timeout)
        sock.connect((parts.hostname, parts.port))
        sock.sendall(post_head(url, "/v1/generate/stream", len(payload), headers) + payload)
        received = bytearray()
        while chunk := sock.recv(bytes_per_read):
            received += chunk
            time.sleep(pause_s)
    return received.decode(errors="replace")


def run_mixed(
    url: str,
    clients: int,
    seconds: float,
    steps: int,
    key: str | None = None,
    slow_pause_s: float = 0.05,
    on_progress: Callable[[int], None] | None = None,
) -> MixedReport:
    """`clients` threads, client c of kind KINDS[c % 5], each sending requests one after another for `seconds`."""
    report, lock = MixedReport(), threading.Lock()
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    hostile = hostile_requests(url, key, steps)
    stop_at = time.monotonic() + seconds

    def record(kind: str, outcome: str | None, problem: str | None = None, latency: float | None = None) -> None:
        with lock:
            if problem is not None:
                report.failures.append(f"{kind}: {problem}")
            else:
                report.outcomes[(kind, outcome)] += 1
                if latency is not None:
                    report.latencies.append(latency)
            if on_progress is not None:
                on_progress(report.requests)

    def back_off(answer: httpx.Response) -> None:
        """An honest client waits as long as a 429's Retry-After asks."""
        if answer.status_code == 429:
            time.sleep(min(float(answer.headers.get("retry-after", 1)), max(0.0, stop_at - time.monotonic())))

    def honest(http: httpx.Client, kind: str, seed: int) -> None:
        body = {"prompt": PROMPT, "num_inference_steps": steps, "seed": seed}
        began = time.perf_counter()
        if kind == "generate":
            answer = http.post("/v1/generate", json=body, headers=auth)
            if answer.status_code == 200:
                record(kind, "image", image_problem(answer, seed), time.perf_counter() - began)
            else:
                code = classify(answer)
                record(kind, code, None if code else f"status {answer.status_code}: {answer.text[:120]!r}")
                back_off(answer)
            return
        with http.stream("POST", "/v1/generate/stream", json=body | {"preview_every": 1}, headers=auth) as answer:
            text = answer.read().decode()
        if answer.status_code != 200:
            code = classify(httpx.Response(answer.status_code, content=text.encode()))
            record(kind, code, None if code else f"status {answer.status_code}: {text[:120]!r}")
            back_off(answer)
            return
        last, data = parse_events(text)[-1] if parse_events(text) else ("", "")
        if last == "done":
            record(kind, "image", image_problem(httpx.Response(200, content=data.encode()), seed),
                   time.perf_counter() - began)  # fmt: skip
        elif last == "error":
            record(kind, json.loads(data)["error"]["code"])
        else:
            record(kind, None, f"the stream ended with {last!r}")

    def slow(seed: int) -> None:
        body = {"prompt": PROMPT, "num_inference_steps": steps, "seed": seed, "preview_every": 1}
        text = slow_stream(url, auth, body, bytes_per_read=256, pause_s=slow_pause_s, timeout=max(60.0, seconds))
        status_line, _, rest = text.partition("\r\n")
        events = parse_events(rest.partition("\r\n\r\n")[2].replace("\r\n", "\n"))
        if " 200 " not in status_line:
            code = classify(httpx.Response(int(status_line.split()[1]), content=rest.partition("\r\n\r\n")[2]))
            record("slow_stream", code, None if code else f"{status_line}: {rest[:120]!r}")
        elif events and events[-1][0] in ("done", "error"):
            record("slow_stream", "image" if events[-1][0] == "done" else json.loads(events[-1][1])["error"]["code"])
        else:
            record("slow_stream", None, f"the slow stream ended with {events[-1:]!r}")

    def cancel(http: httpx.Client, seed: int, rng: random.Random) -> None:
        body = {"prompt": PROMPT, "num_inference_steps": steps, "seed": seed}
        path = rng.choice(("/v1/generate", "/v1/generate/stream"))
        try:
            with http.stream("POST", path, json=body, headers=auth, timeout=rng.uniform(0.05, 1.0)) as answer:
                content = answer.read()
            code = (
                "image" if answer.status_code == 200 else classify(httpx.Response(answer.status_code, content=content))
            )
            record("cancel", code or f"status {answer.status_code}")
        except httpx.TimeoutException:
            record("cancel", "left")

    def client(index: int) -> None:
        kind, rng = KINDS[index % len(KINDS)], random.Random(index)
        with httpx.Client(base_url=url, timeout=max(120.0, 2 * seconds)) as http:
            turn = 0
            while time.monotonic() < stop_at:
                seed = index * 100_000 + turn
                try:
                    if kind in HONEST_KINDS:
                        honest(http, kind, seed)
                    elif kind == "slow_stream":
                        slow(seed)
                    elif kind == "cancel":
                        cancel(http, seed, rng)
                    else:
                        name, send = hostile[(index + turn) % len(hostile)]
                        answer = send(http)
                        code = classify(answer)
                        if answer.status_code == 200 and name in VALID_IMAGES and "images" in answer.json():
                            code = "image"
                        record("hostile", code, None if code else f"{name}: {answer.status_code} {answer.text[:80]!r}")
                except (httpx.TransportError, OSError) as err:
                    record(kind, None, f"no answer: {type(err).__name__}: {err}")
                turn += 1
                if kind not in HONEST_KINDS and kind != "slow_stream":
                    time.sleep(rng.uniform(0.0, 0.2))  # hostile and cancelling clients keep coming

    report.seconds = run_concurrently(client, clients)
    return report


def run_concurrently(client: Callable[[int], None], count: int) -> float:
    """Run client(0) .. client(count - 1) each on its own thread, all at once; seconds until the last ends."""
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(count)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began


def peak_and_current_mb(pid: int) -> tuple[float, float]:
    """(VmHWM, VmRSS) of the process, in MB: its peak and current resident memory."""
    with open(f"/proc/{pid}/status") as status:
        values = dict(line.split(":", 1) for line in status)
    return tuple(int(values[name].split()[0]) / 1024 for name in ("VmHWM", "VmRSS"))  # type: ignore[return-value]


def latency_summary(latencies: list[float]) -> str:
    if not latencies:
        return "none answered"
    return f"p50 {statistics.median(latencies):.2f} s, p95 {sorted(latencies)[int(0.95 * (len(latencies) - 1))]:.2f} s"
