"""Load on `ldm serve`: concurrent clients on localhost, latency p50 / p95, images/s, memory before and after.

Each configuration starts the real command (`ldm serve --model M --port 0 --max-batch B`) in its own process,
warms it up, reads its resident memory (VmRSS), runs `--repeats` rounds of `--clients` clients that each send
`--requests` requests one after another, and reads the memory again. Every answer is checked: status 200, one
image, the seed and prompt asked for (so none is lost or handed to another client). `--max-batch 1` against
the default shows what batching compatible requests buys. A last table times one streamed request with and
without the denoising preview (the page asks for one every 2 steps), which costs a VAE decode each time.

`--section mixed` starts a server with an API key and runs `--mixed-clients` clients for `--mixed-seconds`:
honest ones (JSON and streamed), slow readers, clients that hang up, and hostile ones sending every bad input
of benchmarks/serve_abuse.py. It prints the answers by code, the honest requests' latency, and the server's
peak memory against its idle memory plus twice the peak of one full batch measured alone before the load.

    PYTHONPATH=. python3 benchmarks/serve_load.py --model runs/quickstart/pipeline
    PYTHONPATH=. python3 benchmarks/serve_load.py --model runs/quickstart/pipeline --section mixed
"""

from __future__ import annotations

import argparse
import base64
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from benchmarks.serve_abuse import KINDS, latency_summary, peak_and_current_mb, run_concurrently, run_mixed
from ldm.serve.png import read_generation_settings

PROMPTS = (
    "a red circle on a white background",
    "a blue square on a yellow background",
    "a green triangle on a black background",
    "a yellow circle on a blue background",
)


@dataclass
class LoadReport:
    """What one round of load saw."""

    latencies: list[float] = field(default_factory=list)  # seconds, answered requests
    answered: int = 0  # 200 with the image asked for
    failures: list[str] = field(default_factory=list)  # anything else: status, lost or mixed-up answers
    images: int = 0
    seconds: float = 0.0

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)

    @property
    def p95(self) -> float:
        return statistics.quantiles(self.latencies, n=20, method="inclusive")[-1]

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


def request_body(client: int, index: int, steps: int | None) -> dict:
    """Request `index` of `client`: its own seed and one of the prompts, so every answer can be told apart."""
    body = {"prompt": PROMPTS[(client + index) % len(PROMPTS)], "seed": client * 10_000 + index}
    return body | ({"num_inference_steps": steps} if steps is not None else {})


def run_load(url: str, clients: int, requests_per_client: int, steps: int | None = None) -> LoadReport:
    """`clients` threads each send `requests_per_client` requests to POST /v1/generate, one after another."""
    report = LoadReport()
    lock = threading.Lock()

    def client_loop(client: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            for index in range(requests_per_client):
                body = request_body(client, index, steps)
                began = time.perf_counter()
                answer = http.post("/v1/generate", json=body)
                latency = time.perf_counter() - began
                problem = check_answer(answer, body)
                with lock:
                    if problem:
                        report.failures.append(f"client {client} request {index}: {problem}")
                    else:
                        report.answered += 1
                        report.images += 1
                        report.latencies.append(latency)

    report.seconds = run_concurrently(client_loop, clients)
    return report


def streamed_seconds(url: str, preview_every: int, steps: int | None) -> float:
    """Seconds for one request on POST /v1/generate/stream, to its `done` event, with previews every
    `preview_every` steps (0: none)."""
    body = request_body(0, 0, steps) | {"preview_every": preview_every}
    began = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/generate/stream", json=body, timeout=600) as answer:
        events = [line for line in answer.iter_lines() if line.startswith("event: ")]
    if events[-1] != "event: done":
        raise RuntimeError(f"the stream ended with {events[-1]!r}, not done")
    return time.perf_counter() - began


def check_answer(answer: httpx.Response, body: dict) -> str | None:
    """What is wrong with the answer to `body`, or None."""
    if answer.status_code != 200:
        return f"status {answer.status_code}: {answer.text[:200]}"
    images = answer.json()["images"]
    if len(images) != 1 or images[0]["seed"] != body["seed"]:
        return f"asked for seed {body['seed']}, got {[image['seed'] for image in images]}"
    settings = read_generation_settings(base64.b64decode(images[0]["png_base64"]))
    if (settings["prompt"], settings["seed"]) != (body["prompt"], body["seed"]):
        return f"the PNG says {settings['prompt']!r} seed {settings['seed']}, asked for {body}"
    return None


def resident_mb(pid: int) -> float:
    """The process's resident memory now (VmRSS), in MB."""
    return peak_and_current_mb(pid)[1]


def start_server(model: str, max_batch: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """`ldm serve` on a free port; returns the process and its URL once it answers /v1/health."""
    command = ["ldm", "serve", "--model", model, "--port", "0", "--max-batch", str(max_batch), "--max-queue", "64"]
    command += extra
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = re.search(r"(http://\S+?)/?$", line.strip())
    if match is None:
        process.kill()
        raise RuntimeError(f"ldm serve printed {line!r}, not its URL")
    url = match.group(1)
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v1/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"ldm serve at {url} did not answer /v1/health")


def spread(values: list[float], digits: int = 2) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in (min(values), statistics.median(values), max(values)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20, help="per client")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 1], help="--max-batch values to compare")
    parser.add_argument("--section", choices=("batching", "mixed", "all"), default="batching")
    parser.add_argument("--mixed-clients", type=int, default=120)
    parser.add_argument("--mixed-seconds", type=float, default=180.0)
    args = parser.parse_args()
    failed = False
    if args.section in ("batching", "all"):
        failed |= batching_tables(args)
    if args.section in ("mixed", "all"):
        failed |= mixed_table(args)
    return 1 if failed else 0


def batching_tables(args: argparse.Namespace) -> bool:
    """The --max-batch table and the preview table; True if a request was lost."""

    print(f"{args.clients} clients x {args.requests} requests, {args.repeats} rounds per row; min / median / max")
    print("| --max-batch | p50 latency (s) | p95 latency (s) | images/s | answered | lost | RSS before -> after (MB) |")
    print("|---|---|---|---|---|---|---|")
    failed = False
    for max_batch in args.batches:
        process, url = start_server(args.model, max_batch)
        try:
            run_load(url, args.clients, 2, args.steps)  # warm-up: first calls build kernels and caches
            before = resident_mb(process.pid)
            reports = [run_load(url, args.clients, args.requests, args.steps) for _ in range(args.repeats)]
            after = resident_mb(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=60)
        asked = args.clients * args.requests * args.repeats
        answered = sum(r.answered for r in reports)
        print(
            f"| {max_batch} | {spread([r.p50 for r in reports])} | {spread([r.p95 for r in reports])} "
            f"| {spread([r.images_per_second for r in reports])} | {answered} / {asked} | {asked - answered} "
            f"| {before:.0f} -> {after:.0f} |",
            flush=True,
        )
        for report in reports:
            for failure in report.failures[:5]:
                print(f"  {failure}", file=sys.stderr)
        failed |= answered != asked

    print(f"\none streamed request at a time, {args.repeats * 3} requests per row; seconds min / median / max")
    print("| preview_every | seconds per request |")
    print("|---|---|")
    process, url = start_server(args.model, max_batch=1)
    try:
        streamed_seconds(url, 0, args.steps)  # warm-up
        for every in (0, 2):
            seconds = [streamed_seconds(url, every, args.steps) for _ in range(args.repeats * 3)]
            print(f"| {every} | {spread(seconds, 3)} |", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return failed


def mixed_table(args: argparse.Namespace) -> bool:
    """Mixed honest, slow, cancelling and hostile clients on a server with a key; True if a goal is missed."""
    import secrets
    import tempfile

    key = secrets.token_urlsafe(24)
    with tempfile.NamedTemporaryFile("w", suffix=".key") as key_file:
        key_file.write(key + "\n")
        key_file.flush()
        process, url = start_server(args.model, 8, "--api-key-file", key_file.name)
    auth = {"Authorization": f"Bearer {key}"}
    try:
        httpx.post(f"{url}/v1/generate", json={"prompt": PROMPTS[0]}, headers=auth, timeout=600)  # warm-up
        _, idle = peak_and_current_mb(process.pid)
        batch = {"prompt": PROMPTS[0], "num_images_per_prompt": 8}  # one full batch (--max-batch 8), alone
        if args.steps is not None:
            batch["num_inference_steps"] = args.steps
        httpx.post(f"{url}/v1/generate", json=batch, headers=auth, timeout=600).raise_for_status()
        one_batch_peak, _ = peak_and_current_mb(process.pid)
        one_batch = one_batch_peak - idle
        steps = args.steps or httpx.get(f"{url}/v1/model", headers=auth).json()["defaults"]["num_inference_steps"]
        report = run_mixed(url, args.mixed_clients, args.mixed_seconds, steps, key=key)
        peak, after = peak_and_current_mb(process.pid)
        health = httpx.get(f"{url}/v1/health", headers=auth).json()
    finally:
        process.terminate()
        process.wait(timeout=60)
    codes = report.codes()
    print(
        f"\n{args.mixed_clients} clients ({', '.join(KINDS)}: a fifth each) for {args.mixed_seconds:.0f} s, "
        f"{steps} steps; {report.requests} requests in {report.seconds:.0f} s"
    )
    print("| answer | requests |")
    print("|---|---|")
    for code, count in sorted(codes.items(), key=lambda item: -item[1]):
        print(f"| {code} | {count} |")
    print(f"| no answer, or neither the API's JSON nor an image | {len(report.failures)} |")
    answered = len(report.latencies)
    print(f"\nhonest requests answered with their image: {answered}; {latency_summary(report.latencies)}")
    bound = idle + 2 * one_batch
    print(
        f"server memory: idle {idle:.0f} MB, one full batch alone +{one_batch:.0f} MB, peak under load {peak:.0f} MB "
        f"(bound idle + 2 x batch = {bound:.0f} MB), after {after:.0f} MB; health after: {health}"
    )
    for failure in report.failures[:10]:
        print(f"  {failure}", file=sys.stderr)
    return bool(report.failures) or codes.get("internal_error", 0) > 0 or peak > bound


if __name__ == "__main__":
    raise SystemExit(main())
