"""The HTTP API over a real localhost server: what it draws, what it answers, and every bad input named."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.serve.png import read_generation_settings

PROMPT = "a red circle on a white background"
JSON = {"Content-Type": "application/json"}  # the server refuses a body not declared JSON (415)


@pytest.fixture(scope="module")
def client(server_url: str) -> httpx.Client:
    with httpx.Client(base_url=server_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def pipe(tiny_app):
    return tiny_app.state.queue.pipe


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def decoded(image: dict) -> bytes:
    return base64.b64decode(image["png_base64"])


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ---- what it draws ---------------------------------------------------------------------------------------


def test_image_i_of_a_request_is_the_pipelines_image_of_seed_plus_i(client, pipe):
    answer = client.post("/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 6, "seed": 10,
                                               "num_images_per_prompt": 3})  # fmt: skip
    assert answer.status_code == 200, answer.text
    images = answer.json()["images"]
    assert [image["seed"] for image in images] == [10, 11, 12]
    for i, image in enumerate(images):
        alone = pipe(PROMPT, num_inference_steps=6, generator=torch.Generator().manual_seed(10 + i), progress=False)
        np.testing.assert_array_equal(pixels(decoded(image)), np.asarray(alone.images[0]))


def test_each_png_carries_the_body_that_draws_it_again(client):
    first = client.post("/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 5, "guidance_scale": 3.0,
                                              "num_images_per_prompt": 2})  # fmt: skip
    second_png = decoded(first.json()["images"][1])
    settings = read_generation_settings(second_png)
    assert settings["prompt"] == PROMPT and settings["guidance_scale"] == 3.0 and settings["num_inference_steps"] == 5
    assert settings["seed"] == first.json()["images"][1]["seed"] and settings["num_images_per_prompt"] == 1
    again = client.post("/v1/generate", json=settings)
    # Drawn alone instead of second in a batch of two: the CPU's GEMMs block a batch of one differently, so a
    # pixel may round one level the other way; a different seed or setting would move every pixel.
    replayed, saved = pixels(decoded(again.json()["images"][0])).astype(int), pixels(second_png).astype(int)
    assert np.abs(replayed - saved).max() <= 1 and (replayed != saved).mean() < 0.01


def test_an_unset_seed_is_drawn_and_returned(client):
    seeds = {client.post("/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 2}).json()["settings"]["seed"]
             for _ in range(3)}  # fmt: skip
    assert len(seeds) == 3


def test_the_settings_fill_in_the_folders_defaults(client, pipe):
    settings = client.post("/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 2}).json()["settings"]
    assert settings["guidance_scale"] == pipe.defaults.guidance_scale and settings["sampler"] == pipe.defaults.sampler
    assert settings["height"] == settings["width"] == pipe.default_size


def test_a_stochastic_sampler_draws_each_image_with_its_own_seed(client, pipe):
    body = {"prompt": PROMPT, "num_inference_steps": 4, "sampler": "euler_ancestral", "seed": 3,
            "num_images_per_prompt": 2}  # fmt: skip
    images = client.post("/v1/generate", json=body).json()["images"]
    for i, image in enumerate(images):
        alone = pipe(PROMPT, num_inference_steps=4, sampler="euler_ancestral", progress=False, seed=3 + i)
        np.testing.assert_array_equal(pixels(decoded(image)), np.asarray(alone.images[0]))


def test_image_to_image_starts_from_the_given_image_at_its_size(client, pipe):
    start = np.zeros((8, 12, 3), np.uint8)
    start[:, :6] = 255
    body = {"prompt": PROMPT, "image": png_base64(start), "strength": 0.5, "num_inference_steps": 6, "seed": 1}
    answer = client.post("/v1/generate", json=body).json()
    assert (answer["settings"]["height"], answer["settings"]["width"]) == (8, 12)
    assert answer["settings"]["strength"] == 0.5
    alone = pipe(PROMPT, image=Image.fromarray(start), strength=0.5, num_inference_steps=6, progress=False, seed=1)
    np.testing.assert_array_equal(pixels(decoded(answer["images"][0])), np.asarray(alone.images[0]))


def test_accept_image_png_answers_with_the_png_itself(client):
    answer = client.post("/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 2, "seed": 7},
                         headers={"Accept": "image/png"})  # fmt: skip
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert answer.headers["x-seed"] == "7" and read_generation_settings(answer.content)["seed"] == 7


def test_the_stream_reports_queue_steps_previews_and_the_images(client):
    body = {"prompt": PROMPT, "num_inference_steps": 6, "preview_every": 2, "num_images_per_prompt": 2}
    with client.stream("POST", "/v1/generate/stream", json=body) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = parse_events(stream.iter_text())
    kinds = [kind for kind, _ in events]
    assert kinds == ["queued", "started", *["progress"] * 6, "done"]
    progress = [data for kind, data in events if kind == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5, 6] and {p["steps"] for p in progress} == {6}
    with_previews = [p["step"] for p in progress if "previews" in p]
    assert with_previews == [2, 4]  # the 6th x0 is the image itself
    assert all(len(p["previews"]) == 2 for p in progress if "previews" in p)
    assert pixels(base64.b64decode(progress[1]["previews"][0])).shape == (16, 16, 3)
    assert len(events[-1][1]["images"]) == 2


def parse_events(chunks) -> list[tuple[str, dict]]:
    text = "".join(chunks)
    events = []
    for block in filter(None, text.split("\n\n")):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# ---- what it says about itself ---------------------------------------------------------------------------


def test_health_says_ok_and_how_much_work_waits(client):
    assert client.get("/v1/health").json() == {"status": "ok", "queued": 0, "running": 0}


def test_model_describes_defaults_sizes_and_limits(client, pipe):
    info = client.get("/v1/model").json()
    assert info["defaults"]["sampler"] == pipe.defaults.sampler and "euler_ancestral" in info["samplers"]
    assert info["default_size"] == 16 and info["size_multiple"] == 4 and info["max_prompt_tokens"] == 77
    assert info["limits"]["max_images"] == 8 and info["limits"]["max_side"] == 64


def test_the_openapi_description_lists_the_api_and_no_page_needs_a_cdn(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/generate/stream", "/v1/health", "/v1/model"} <= set(spec["paths"])
    body = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "negative_prompt", "guidance_scale", "num_inference_steps", "seed"} <= set(body["properties"])
    assert client.get("/docs").status_code == 404  # Swagger UI would load its scripts from a CDN
    page = client.get("/").text
    assert "http://" not in page and "https://" not in page


# ---- every bad input, by name, never a 500 ---------------------------------------------------------------

BLACK_8X8 = png_base64(np.zeros((8, 8, 3), np.uint8))
BAD_BODIES = [
    ("{bad json", 400, "invalid_json", None),
    ("[1, 2]", 400, "invalid_json", None),
    ({"prompt": PROMPT, "guidance": 3}, 422, "unknown_field", "guidance"),
    ({}, 422, "missing_field", "prompt"),
    ({"prompt": 1}, 422, "invalid_value", "prompt"),
    ({"prompt": PROMPT, "num_inference_steps": "20"}, 422, "invalid_value", "num_inference_steps"),
    ({"prompt": PROMPT, "num_inference_steps": 0}, 422, "out_of_range", "num_inference_steps"),
    ({"prompt": PROMPT, "num_inference_steps": 201}, 422, "out_of_range", "num_inference_steps"),
    ({"prompt": PROMPT, "height": 17}, 422, "invalid_value", "height"),
    ({"prompt": PROMPT, "width": 68}, 422, "out_of_range", "width"),
    ({"prompt": PROMPT, "num_images_per_prompt": 9}, 422, "too_many_images", "num_images_per_prompt"),
    ({"prompt": PROMPT, "num_images_per_prompt": 0}, 422, "out_of_range", "num_images_per_prompt"),
    ({"prompt": "circle " * 80}, 422, "prompt_too_long", "prompt"),
    ({"prompt": "x" * 2001}, 422, "prompt_too_long", "prompt"),
    ({"prompt": PROMPT, "negative_prompt": "blurry " * 80}, 422, "prompt_too_long", "negative_prompt"),
    ({"prompt": PROMPT, "sampler": "plms"}, 422, "invalid_value", "sampler"),
    ({"prompt": PROMPT, "sampler": "euler_ancestral", "eta": 0.5}, 422, "invalid_value", "eta"),
    ({"prompt": PROMPT, "guidance_scale": -1}, 422, "out_of_range", "guidance_scale"),
    ({"prompt": PROMPT, "seed": -1}, 422, "out_of_range", "seed"),
    ({"prompt": PROMPT, "seed": 2**32}, 422, "out_of_range", "seed"),
    ({"prompt": PROMPT, "strength": 0.5}, 422, "invalid_value", "strength"),
    ({"prompt": PROMPT, "image": "not base64!"}, 422, "invalid_value", "image"),
    ({"prompt": PROMPT, "image": base64.b64encode(b"not an image").decode()}, 422, "invalid_value", "image"),
    ({"prompt": PROMPT, "image": png_base64(np.zeros((10, 10, 3), np.uint8))}, 422, "invalid_value", "image"),
    ({"prompt": PROMPT, "image": png_base64(np.zeros((8, 72, 3), np.uint8))}, 422, "out_of_range", "image"),
    ({"prompt": PROMPT, "image": BLACK_8X8, "height": 12}, 422, "invalid_value", "height"),
    ({"prompt": PROMPT, "preview_every": -1}, 422, "out_of_range", "preview_every"),
]


@pytest.mark.parametrize(("body", "status", "code", "field"), BAD_BODIES, ids=[c for _, _, c, _ in BAD_BODIES])
def test_a_bad_request_is_refused_with_its_field_named(client, body, status, code, field):
    content = body if isinstance(body, str) else json.dumps(body)
    for path in ("/v1/generate", "/v1/generate/stream"):
        answer = client.post(path, content=content, headers=JSON)
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert (error["code"], error["field"]) == (code, field), error
        if field is not None:
            assert error["message"].startswith(f"{field}: ")


def test_png_for_several_images_is_not_acceptable(client):
    answer = client.post("/v1/generate", json={"prompt": PROMPT, "num_images_per_prompt": 2},
                         headers={"Accept": "image/png"})  # fmt: skip
    assert answer.status_code == 406 and answer.json()["error"]["field"] == "num_images_per_prompt"


def test_a_body_over_the_limit_is_refused_declared_or_streamed(client, tiny_app):
    limit = tiny_app.state.limits.max_body_bytes
    too_big = json.dumps({"prompt": PROMPT, "image": "A" * limit}).encode()
    declared = client.post("/v1/generate", content=too_big, headers=JSON)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"
    chunked = client.post("/v1/generate", content=iter([too_big[: limit // 2], too_big[limit // 2 :]]), headers=JSON)
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"


def test_unknown_paths_and_methods_answer_json_errors(client):
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    answer = client.get("/v1/generate")
    assert answer.status_code == 405 and answer.json()["error"]["code"] == "method_not_allowed"


def test_the_server_still_serves_after_every_bad_request(client):
    assert client.post("/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 2}).status_code == 200


@pytest.mark.parametrize(
    "content",
    [b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", b'{"prompt": "a", "seed": ' + b"1" * 5000 + b"}"],
    ids=["nested-5000-deep", "an-int-of-5000-digits"],
)
def test_json_that_breaks_the_parser_is_refused_as_invalid_json(client, content):
    answer = client.post("/v1/generate", content=content, headers=JSON)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"


def test_an_error_message_does_not_echo_a_huge_input(client):
    answer = client.post("/v1/generate", json={"prompt": "a", "sampler": "x" * 100_000})
    error = answer.json()["error"]
    assert answer.status_code == 422 and error["field"] == "sampler" and len(error["message"]) < 400


def test_a_wrong_method_is_answered_405_with_the_allowed_ones(client):
    answer = client.get("/v1/generate")
    assert answer.status_code == 405 and answer.json()["error"]["code"] == "method_not_allowed"
    assert answer.headers["allow"] == "POST"
