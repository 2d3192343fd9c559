"""Every PNG the server writes can be replayed: each image's seed lies in the API's own seed range.

Image i of a request is drawn with seed + i and its PNG records that seed as the body that draws it again, which
the API accepts only in SEED_RANGE = [0, 2^32 - 1]. So a request may not draw an image with a seed above the range:
either it is refused up front, naming the seed (422 out_of_range), or every image's seed stays in the range (and
its recorded body validates and resolves to that seed). A seed the server draws itself must do the same.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ldm.serve import requests
from ldm.serve.png import png_with_settings, read_generation_settings
from ldm.serve.requests import RequestError, ServeLimits, parse_body, resolve_request
from ldm.serve.schema import SEED_RANGE, GenerateRequest
from tests.pipeline.tiny_models import tiny_pipeline

TOP = SEED_RANGE[1]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def replayed_seeds(spec: requests.GenerationSpec, seed: int, pipe) -> list[int]:
    """The seeds the body recorded in the PNG of the image of `seed` resolves to, sent back as it is."""
    png = png_with_settings(Image.new("RGB", (2, 2)), spec.settings_json(seed), "tiny")
    body = json.dumps(read_generation_settings(png)).encode()
    return resolve_request(parse_body(body), pipe, ServeLimits()).seeds


def assert_every_image_replays(request: GenerateRequest, pipe) -> None:
    try:
        spec = resolve_request(request, pipe, ServeLimits())
    except RequestError as err:  # refused before anything is drawn: no PNG records a seed the API refuses
        assert (err.status, err.code, err.field) == (422, "out_of_range", "seed"), err.message
        assert request.seed is not None and request.seed + request.num_images_per_prompt - 1 > TOP
        return
    assert len(spec.seeds) == len(set(spec.seeds)) == request.num_images_per_prompt
    for seed in spec.seeds:
        assert SEED_RANGE[0] <= seed <= TOP, f"image seed {seed} is outside the API's seed range {SEED_RANGE}"
        assert replayed_seeds(spec, seed, pipe) == [seed]


@pytest.mark.parametrize(("seed", "images"), [(TOP, 1), (TOP, 2), (TOP - 1, 2), (TOP - 7, 8), (TOP - 3, 8)])
def test_every_image_of_a_request_at_the_top_of_the_seed_range_replays(pipe, seed, images):
    request = GenerateRequest(prompt="a red circle", seed=seed, num_images_per_prompt=images, num_inference_steps=2)
    assert_every_image_replays(request, pipe)


@pytest.mark.parametrize("images", [1, 2, 8])
def test_a_drawn_seed_at_the_top_of_its_range_replays(pipe, monkeypatch, images):
    monkeypatch.setattr(requests.secrets, "randbelow", lambda n: n - 1)  # the largest seed it could draw
    request = GenerateRequest(prompt="a red circle", num_images_per_prompt=images, num_inference_steps=2)
    assert_every_image_replays(request, pipe)
