"""The page in a real browser: Debian's chromium, driven by Playwright, against the tiny model's server.

Each test goes through the page as a person does (types, clicks, watches, downloads) and checks what the
server received or sent. Set LDM_CHROMIUM to use another chromium executable.
"""

from __future__ import annotations

import base64
import io
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from playwright.sync_api import Browser, Page, Request, expect, sync_playwright

from ldm.serve import ServeLimits, create_app, serve_in_background
from ldm.serve.png import read_generation_settings
from ldm.serve.security import ServeAccess
from tests.pipeline.tiny_models import tiny_pipeline

CHROMIUM = os.environ.get("LDM_CHROMIUM", "/usr/bin/chromium")
PROMPT = "a red circle on a white background"
SEED = 1234
DONE = re.compile(r"^Done in ")
# Records what the page shows over time: every image put into #preview (src, alt) and every progress value.
RECORD_PAGE = """() => {
  window.seen = { previews: [], progress: [] };
  new MutationObserver((mutations) => {
    for (const m of mutations) {
      for (const node of m.addedNodes) window.seen.previews.push({ src: node.src, alt: node.alt });
    }
  }).observe(document.getElementById("preview"), { childList: true });
  const bar = document.getElementById("progress");
  new MutationObserver(() => window.seen.progress.push(bar.value))
    .observe(bar, { attributes: true, attributeFilter: ["value"] });
}"""


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread_for_the_module() -> Iterator[None]:
    """The tiny model runs fastest on one thread, and it leaves the other core to chromium."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless chromium for the module; a missing executable fails the tests (they must not pass unseen)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no chromium at {CHROMIUM}: the page's tests drive Debian's chromium, install it with "
            "`apt-get install chromium` (or set LDM_CHROMIUM to a chromium executable)"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@contextmanager
def open_page(browser: Browser, url: str, on_request: Callable[[Request], None] | None = None) -> Iterator[Page]:
    """The page at `url` in a fresh context, once it has read the model (Generate is enabled); fails the test
    if the page's script threw."""
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    errors: list[Exception] = []
    page.on("pageerror", lambda error: errors.append(error))  # Playwright cannot wrap a builtin method
    if on_request is not None:
        page.on("request", on_request)
    try:
        page.goto(url)
        expect(page.locator("#generate")).to_be_enabled()
        expect(page.locator("#status")).to_have_text("Ready.")
        yield page
    finally:
        context.close()
    assert not errors, f"the page's script threw: {errors}"


@pytest.fixture
def page(browser: Browser, server_url: str) -> Iterator[Page]:
    with open_page(browser, server_url) as page:
        yield page


def fill_form(page: Page, prompt: str, steps: int, seed: int | None = None) -> None:
    page.fill("#prompt", prompt)
    page.fill("#num_inference_steps", str(steps))
    if seed is not None:
        page.uncheck("#random-seed")
        page.fill("#seed", str(seed))


def generate_and_wait(page: Page) -> None:
    page.click("#generate")
    expect(page.locator("#status")).to_have_text(DONE)


def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def test_generate_shows_progress_and_previews_and_downloads_a_png_that_redraws_itself(
    page: Page, server_url: str
) -> None:
    """Generate with typed settings: the bar advances, previews change, the image lands in the gallery, and its
    download carries the typed prompt, seed and steps, which the API redraws to the same pixels."""
    fill_form(page, PROMPT, steps=20, seed=SEED)
    page.evaluate(RECORD_PAGE)
    generate_and_wait(page)

    seen = page.evaluate("window.seen")
    fractions = [value for value in seen["progress"] if 0 < value < 1]
    assert len(set(fractions)) >= 2 and fractions == sorted(fractions), seen["progress"]
    assert seen["progress"][-1] == 1
    alts = [image["alt"] for image in seen["previews"]]
    previews = [image["src"] for image in seen["previews"] if image["alt"] == "denoising preview"]
    assert len(set(previews)) >= 2, "the preview did not change while sampling"
    assert alts[-1] == "generated image" and alts.index("generated image") > alts.index("denoising preview")

    items = page.locator("#gallery figure.item")
    expect(items).to_have_count(1)
    expect(items.locator("figcaption")).to_have_text(f"{PROMPT} · seed {SEED}")
    with page.expect_download() as download_info:
        items.locator("a.download").click()
    download = download_info.value
    assert download.suggested_filename == f"ldm-{SEED}.png"
    png = Path(download.path()).read_bytes()
    assert png == base64.b64decode(seen["previews"][-1]["src"].removeprefix("data:image/png;base64,"))

    settings = read_generation_settings(png)
    assert (settings["prompt"], settings["seed"], settings["num_inference_steps"]) == (PROMPT, SEED, 20)
    answer = httpx.post(f"{server_url}/v1/generate", json=settings, headers={"Accept": "application/json"}, timeout=60)
    assert answer.status_code == 200, answer.text
    redrawn = base64.b64decode(answer.json()["images"][0]["png_base64"])
    assert np.array_equal(pixels(redrawn), pixels(png))


def test_cancel_stops_the_run_on_the_server(page: Page, server_url: str) -> None:
    """Cancel after the first step: the page says Cancelled and the server is idle within seconds of a run
    that would take far longer."""
    fill_form(page, PROMPT, steps=200)  # the server's max
    # a stochastic sampler draws the 8 images one call after another: 1600 steps, about 15 s here
    page.select_option("#sampler", "ddpm")
    page.fill("#num_images_per_prompt", "8")
    page.click("#generate")
    expect(page.locator("#status")).to_have_text(re.compile(r"^Step \d+ of 1600\.$"))
    assert httpx.get(f"{server_url}/v1/health").json()["running"] == 1
    page.click("#cancel")
    clicked = time.monotonic()
    expect(page.locator("#status")).to_have_text("Cancelled.")
    while (health := httpx.get(f"{server_url}/v1/health").json()) != {"status": "ok", "queued": 0, "running": 0}:
        assert time.monotonic() - clicked < 3, f"the server still works on the cancelled run: {health}"
        time.sleep(0.05)
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#cancel")).to_be_disabled()
    expect(page.locator("#gallery figure.item")).to_have_count(0)


def test_use_as_start_sends_an_image_to_image_request(page: Page) -> None:
    """'Use as start' shows the image-to-image panel; Generate then sends that image with the chosen strength
    (and no size: the image sets it), and the new image joins the gallery first."""
    fill_form(page, PROMPT, steps=4, seed=SEED)
    generate_and_wait(page)
    expect(page.locator("#init-image")).to_be_hidden()
    page.click("#gallery figure.item button.reuse")
    expect(page.locator("#init-image")).to_be_visible()
    expect(page.locator("#width")).to_be_disabled()
    page.fill("#strength", "0.5")
    expect(page.locator("#strength-value")).to_have_text("0.5")
    page.fill("#prompt", "a blue square on a yellow background")

    with page.expect_request(lambda request: request.url.endswith("/v1/generate/stream")) as request_info:
        generate_and_wait(page)
    body = request_info.value.post_data_json
    assert body["strength"] == 0.5 and "width" not in body and "height" not in body
    assert read_generation_settings(base64.b64decode(body["image"]))["seed"] == SEED
    captions = page.locator("#gallery figure.item figcaption")
    expect(captions).to_have_count(2)
    expect(captions.first).to_contain_text("a blue square on a yellow background")

    page.click("#clear-init")
    expect(page.locator("#init-image")).to_be_hidden()
    expect(page.locator("#width")).to_be_enabled()


def test_steps_over_the_max_are_stopped_by_the_browser(page: Page) -> None:
    """The steps input carries the server's max, so the browser refuses the form before anything is sent."""
    fill_form(page, PROMPT, steps=201)
    page.click("#generate")
    assert page.eval_on_selector("#num_inference_steps", "input => input.validity.rangeOverflow")
    expect(page.locator("#status")).to_have_text("Ready.")  # generate() did not run: it says Sending… first


def test_a_refused_prompt_shows_the_server_message_and_marks_the_field(page: Page) -> None:
    """A prompt over the text encoder's 77 tokens: #error shows the server's message naming the prompt, which
    is marked invalid; a good prompt then clears both."""
    fill_form(page, "a red circle on a white background " * 12, steps=4)
    page.click("#generate")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text(re.compile(r"^prompt: \d+ tokens .* the text encoder reads 77"))
    expect(page.locator("#prompt")).to_have_class(re.compile(r"\binvalid\b"))
    expect(page.locator("#status")).to_have_text("Not started.")

    page.fill("#prompt", PROMPT)
    generate_and_wait(page)
    expect(error).to_be_hidden()
    expect(page.locator("#prompt")).not_to_have_class(re.compile(r"\binvalid\b"))


def test_the_page_loads_nothing_from_outside_the_server(browser: Browser, server_url: str) -> None:
    """Every request of loading the page and a whole generation (with previews) goes to the server."""
    urls: list[str] = []
    with open_page(browser, server_url, on_request=lambda request: urls.append(request.url)) as page:
        fill_form(page, PROMPT, steps=6)
        generate_and_wait(page)
    assert f"{server_url}/v1/generate/stream" in urls
    # a gallery image is a blob: URL of the server's PNG, held by the page under the server's origin
    outside = [url for url in urls if not url.removeprefix("blob:").startswith(f"{server_url}/")]
    assert not outside, f"the page loaded from outside {server_url}: {outside}"


def test_a_server_with_a_key_asks_for_it_once_and_the_page_sends_it_on_every_call(browser: Browser) -> None:
    """The page loads without the key, asks for it when the API answers 401 (again if it is wrong), then sends
    it as the Bearer header on every API call, the stream included, and keeps it for the tab: a reload does
    not ask again."""
    key = "the-key-of-the-page-test"
    app = create_app(tiny_pipeline(), ServeLimits(), access=ServeAccess(api_key=key))
    with serve_in_background(app) as url:
        context = browser.new_context()
        page = context.new_page()
        errors: list[Exception] = []
        page.on("pageerror", lambda error: errors.append(error))
        api_calls: list[Request] = []
        page.on("request", lambda request: "/v1/" in request.url and api_calls.append(request))
        page.goto(url)
        expect(page.locator("#key-form")).to_be_visible()
        expect(page.locator("#key-error")).to_contain_text("this server needs its API key")
        expect(page.locator("#generate")).to_be_disabled()
        page.fill("#api-key", "not-the-key")
        page.click("#use-key")
        expect(page.locator("#key-error")).to_contain_text("the API key is wrong")
        expect(page.locator("#key-form")).to_be_visible()
        page.fill("#api-key", key)
        page.click("#use-key")
        expect(page.locator("#key-form")).to_be_hidden()
        expect(page.locator("#status")).to_have_text("Ready.")

        fill_form(page, PROMPT, steps=4)
        with page.expect_response(lambda answer: answer.url.endswith("/v1/generate/stream")) as stream:
            generate_and_wait(page)
        assert stream.value.status == 200
        expect(page.locator("#gallery figure.item")).to_have_count(1)
        sent = [request.all_headers().get("authorization") for request in api_calls]
        assert sent == [None, "Bearer not-the-key", f"Bearer {key}", f"Bearer {key}"], sent

        page.reload()
        expect(page.locator("#status")).to_have_text("Ready.")
        expect(page.locator("#key-form")).to_be_hidden()
        context.close()
    assert not errors, f"the page's script threw: {errors}"
