"""The web app and HTTP API around one loaded pipeline: `create_app(pipe, ...)` returns a FastAPI app.

    GET  /                    the page (ldm/serve/static: no script, font or style from the internet)
    GET  /v1/health           {"status": "ok", "queued": n, "running": n}; 503 `unavailable` when no worker runs
    GET  /v1/model            what the folder holds, its defaults, sizes and this server's limits
    POST /v1/generate         JSON in; JSON with base64 PNGs out, or the PNG itself with `Accept: image/png`
    POST /v1/generate/stream  the same, as server-sent events: queued, started, progress (with previews), done
    GET  /openapi.json        the OpenAPI description

Every request first passes `AccessGuard` (ldm.serve.security): 403 `bad_host` / `bad_origin`, 401
`unauthorized` without the server's key, 415 for a body not sent as application/json.
Every error is JSON {"error": {"code", "field", "message"}} with a 4xx status for what the client can change
(400 bad JSON, 404, 405, 406, 408 body too slow, 413 body too large, 422 invalid field or too much work, 429
queue full with Retry-After) and a 5xx for what it cannot (500 internal_error, 503 unavailable / out_of_memory /
cancelled, 504 deadline_exceeded). A client that leaves (closes the connection) cancels its request, queued or running.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

import ldm
from ldm.generation import LatentDiffusionPipeline
from ldm.serve.errors import RequestError, internal_error
from ldm.serve.events import StreamEvents
from ldm.serve.png import png_with_settings
from ldm.serve.requests import ServeLimits, parse_body, resolve_request
from ldm.serve.schema import ErrorResponse, GenerateRequest, GenerateResponse, Health, ModelInfo
from ldm.serve.security import AccessGuard, ServeAccess
from ldm.serve.worker import GenerationQueue, Job, QueueFull

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
FINAL_EVENTS = ("done", "error", "cancelled")
# Only a server shutting down cancels a request whose client still listens: a client that cancels has left.
CANCELLED_MESSAGE = "the request was cancelled: the server is shutting down"
ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 406, 408, 413, 415, 422, 429, 503, 504)}
REQUEST_BODY = {"content": {"application/json": {"schema": GenerateRequest.model_json_schema()}}, "required": True}


def create_app(
    pipe: LatentDiffusionPipeline,
    limits: ServeLimits | None = None,
    folder: str | Path | None = None,
    access: ServeAccess | None = None,
) -> FastAPI:
    """The app serving `pipe` (loaded from `folder`, which /v1/model describes), refusing what `access` refuses
    (default: a loopback server without a key). The generation thread starts and stops with the app (its
    lifespan)."""
    limits = limits or ServeLimits()
    queue = GenerationQueue(pipe, limits.max_queue, limits.max_batch, deadline_s=limits.deadline_s)
    info = model_info(pipe, limits, folder)
    decoding = asyncio.Semaphore(limits.max_decoding)
    intake = Intake()  # requests past the queue check whose bodies are still being read and checked

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        queue.start()
        yield
        await run_in_threadpool(queue.close)

    app = FastAPI(
        title="latent-diffusion-lab",
        version=ldm.__version__,
        description="Text to image with one latent diffusion model folder.",
        docs_url=None,  # the interactive docs load scripts from a CDN; the page works offline
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.queue, app.state.limits = queue, limits
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(AccessGuard, access=access or ServeAccess())

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull) -> JSONResponse:
        body = RequestError(429, "queue_full", None, str(err)).body()
        return JSONResponse(body, status_code=429, headers={"Retry-After": str(err.retry_after)})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        body = RequestError(err.status_code, code, None, str(err.detail)).body()
        return JSONResponse(body, err.status_code, headers=err.headers)  # 405 keeps its Allow header

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, err: ClientDisconnect) -> Response:
        return Response(status_code=499)  # the client left while sending its body: nobody reads an answer

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
        """A bug still answers in the API's shape (the traceback goes to the log)."""
        logger.exception("unexpected error answering %s %s", request.method, request.url.path)
        return JSONResponse(internal_error(err).body(), status_code=500)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/v1/health", response_model=Health, responses={503: {"model": ErrorResponse}})
    async def health() -> dict:
        """ok, or 503 in the API's error shape (code `unavailable`) when no worker thread runs the queue."""
        if not queue.alive:
            raise queue.unavailable()
        return {"status": "ok", "queued": queue.queued, "running": queue.running}

    @app.get("/v1/model", response_model=ModelInfo)
    async def model() -> dict:
        return info

    async def submit(
        request: Request, single_image: bool = False, streamed: bool = False
    ) -> tuple[Job, StreamEvents, int]:
        """Read, check and queue the request; its events arrive on the returned StreamEvents. Previews are
        decoded only for a `streamed` answer: nobody would receive them otherwise."""
        arrived = time.monotonic()  # the deadline counts from here
        # Before the body, counting the bodies being read as waiting: a full queue costs no reading or decoding,
        # and at most max_queue bodies are held at once.
        queue.check_room(arriving=intake.count)
        with intake:
            raw = await read_body(request, limits.max_body_bytes, limits.body_timeout_s)
            async with decoding:  # at most max_decoding bodies parsed and decoded at once
                spec = await run_in_threadpool(lambda: resolve_request(parse_body(raw), pipe, limits))
        if not streamed:  # batch_key reads preview_every, so this joins the batches of preview-less requests
            spec = replace(spec, request=replace(spec.request, preview_every=0))
        if single_image and len(spec.seeds) != 1:
            raise RequestError(
                406,
                "not_acceptable",
                "num_images_per_prompt",
                f"num_images_per_prompt: an image/png answer holds one image, got {len(spec.seeds)}; "
                "ask for application/json",
            )
        events = StreamEvents(asyncio.get_running_loop())
        job = Job(spec, events.put, submitted=arrived)
        position = queue.submit(job)
        return job, events, position

    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        responses={**ERRORS, 200: {"content": {"image/png": {}}}},
        openapi_extra={"requestBody": REQUEST_BODY},
    )
    async def generate(request: Request) -> Response:
        """Draw the images; the answer is JSON, or with `Accept: image/png` (one image) the PNG itself."""
        want_png = accepts_png(request.headers.get("accept", ""))
        job, events, _ = await submit(request, single_image=want_png)
        event = await final_event(job, events, request)
        if event is None:  # the client left; nobody reads this
            return Response(status_code=499)
        images = await finished_images(event, job, info["name"])
        if want_png:
            return Response(images[0]["png"], media_type="image/png", headers={"X-Seed": str(images[0]["seed"])})
        return JSONResponse(response_body(job, images))

    @app.post(
        "/v1/generate/stream",
        responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
        openapi_extra={"requestBody": REQUEST_BODY},
    )
    async def generate_stream(request: Request) -> StreamingResponse:
        """Server-sent events: `queued` {position}, `started`, `progress` {step, steps, previews?: [base64 PNG]},
        then `done` (the /v1/generate JSON), `error` {error} or `cancelled`. Closing the stream cancels."""
        job, events, position = await submit(request, streamed=True)

        async def stream() -> AsyncIterator[str]:
            try:
                yield server_sent_event("queued", {"position": position})
                while True:
                    event = await events.get()
                    kind = event["event"]
                    if kind == "done":
                        images = await finished_images(event, job, info["name"])
                        yield server_sent_event("done", response_body(job, images))
                    elif kind == "error":
                        yield server_sent_event("error", event["error"].body())
                    elif kind == "progress":
                        payload = {"step": event["step"], "steps": event["steps"]}
                        if "previews" in event:
                            payload["previews"] = [base64_png(image) for image in event["previews"]]
                        yield server_sent_event("progress", payload)
                    elif kind == "cancelled":
                        yield server_sent_event("cancelled", {"message": CANCELLED_MESSAGE})
                    else:
                        yield server_sent_event(kind, {})
                    if kind in FINAL_EVENTS:
                        return
            finally:
                job.cancel()  # the client left mid-stream (or the job is over, and this changes nothing)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def model_info(pipe: LatentDiffusionPipeline, limits: ServeLimits, folder: str | Path | None) -> dict:
    """GET /v1/model's answer: the folder's parts and defaults, the sizes it draws and the server's limits."""
    from ldm.diffusion.sampler_table import SAMPLER_NAMES
    from ldm.generation.model_folder import MODEL_INDEX

    local = Path(folder).resolve() if folder is not None and Path(folder).is_dir() else None
    components = {}
    if local is not None and (local / MODEL_INDEX).is_file():
        index = json.loads((local / MODEL_INDEX).read_text())
        components = {name: value for name, value in index.items() if not name.startswith("_")}
    return {
        # the folder's own name: its path on this machine is none of a client's business
        "name": local.name if local is not None else str(folder or "in-memory pipeline"),
        "components": components,
        "defaults": asdict(pipe.defaults),
        "samplers": list(SAMPLER_NAMES),
        "default_size": pipe.default_size,
        "size_multiple": pipe.size_multiple,
        "max_prompt_tokens": pipe.text_encoder.max_length,
        "prediction_type": pipe.noise_schedule.prediction,
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "limits": asdict(limits) | {"max_side": limits.side_limit(pipe), "max_work": limits.work_limit(pipe)},
    }


class Intake:
    """How many requests are between the queue check and the queue (reading and checking their bodies)."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> None:
        self.count += 1  # the event loop's thread only: no lock needed

    def __exit__(self, *exc: object) -> None:
        self.count -= 1


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused (413) as soon as it passes `limit` bytes, declared or sent, and (408) when it
    has not all arrived within `timeout_s` seconds, so a slow sender cannot hold its place."""
    too_large = RequestError(413, "body_too_large", None, f"the body is larger than this server's {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        message = f"the body did not arrive within this server's {timeout_s:g} s"
        raise RequestError(408, "body_timeout", None, message) from None


async def final_event(job: Job, events: StreamEvents, request: Request) -> dict | None:
    """The job's last event (done, error or cancelled); None, with the job cancelled, when the client leaves."""
    left = asyncio.ensure_future(client_left(request))
    try:
        while True:
            next_event = asyncio.ensure_future(events.get())
            await asyncio.wait({next_event, left}, return_when=asyncio.FIRST_COMPLETED)
            if not next_event.done():
                next_event.cancel()
                job.cancel()
                return None
            if next_event.result()["event"] in FINAL_EVENTS:
                return next_event.result()
    finally:
        left.cancel()


async def client_left(request: Request) -> None:
    """Returns when the client closes the connection (after the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def finished_images(event: dict, job: Job, model_name: str) -> list[dict]:
    """The job's images as PNGs carrying their settings; raises the job's error, or 503 if it was cancelled."""
    if event["event"] == "error":
        raise event["error"]
    if event["event"] == "cancelled":
        raise RequestError(503, "cancelled", None, CANCELLED_MESSAGE)
    spec = job.spec

    def encode() -> list[dict]:
        return [
            {"seed": seed, "png": png_with_settings(image, spec.settings_json(seed), model_name)}
            for seed, image in zip(spec.seeds, event["images"], strict=True)
        ]

    return await run_in_threadpool(encode)


def response_body(job: Job, images: list[dict]) -> dict:
    settings = job.spec.settings_json(job.spec.seeds[0]) | {"num_images_per_prompt": len(images)}
    return {
        "images": [{"seed": i["seed"], "png_base64": base64.b64encode(i["png"]).decode()} for i in images],
        "settings": settings,
        "timings": job.timings,
    }


def base64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def server_sent_event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


def accepts_png(accept: str) -> bool:
    """Whether the Accept header asks for image/png rather than JSON."""
    types = [part.split(";")[0].strip() for part in accept.split(",")]
    return "image/png" in types and "application/json" not in types
