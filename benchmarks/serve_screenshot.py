"""A screenshot of the `ldm serve` page for the docs: the form, the last run's images and a filled gallery.

Serves the model folder in the background, generates two prompts of four images each in headless chromium
(as a person would: typing, clicking Generate, waiting for Done) and saves the whole page.

    python3 benchmarks/serve_screenshot.py --model runs/quickstart/pipeline --out docs/images/serve_page.png
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from ldm.generation import LatentDiffusionPipeline
from ldm.serve import ServeLimits, create_app, serve_in_background

PROMPTS = ["a red circle on a white background", "a blue square on a yellow background"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the model folder to serve")
    parser.add_argument("--out", default="docs/images/serve_page.png", help="the PNG to write")
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0, help="the first image's seed, so the screenshot repeats")
    parser.add_argument(
        "--chromium",
        default=os.environ.get("LDM_CHROMIUM", "/usr/bin/chromium"),
        help="chromium executable (Debian: apt-get install chromium; default: $LDM_CHROMIUM or /usr/bin/chromium)",
    )
    args = parser.parse_args()
    if not Path(args.chromium).is_file():
        parser.error(f"no chromium at {args.chromium}: install Debian's (apt-get install chromium) or pass --chromium")

    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with serve_in_background(create_app(pipe, ServeLimits(), folder=args.model)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        expect(page.locator("#generate")).to_be_enabled()
        page.uncheck("#random-seed")
        page.fill("#seed", str(args.seed))
        page.fill("#num_images_per_prompt", str(args.images))
        for prompt in PROMPTS:  # the model's default steps, sampler and guidance
            page.fill("#prompt", prompt)
            page.click("#generate")
            expect(page.locator("#status")).to_have_text(re.compile(r"^Done in "), timeout=600_000)
        page.screenshot(path=out, full_page=True)
        browser.close()
    print(out)


if __name__ == "__main__":
    main()
